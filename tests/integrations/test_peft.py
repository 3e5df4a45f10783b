"""LoRA through peft with persample's engines: only the adapters are trainable, and each sequence's adapter
gradients from GhostClipping (dropout on) and from the vmap pipeline equal an autograd reference, on Llama
(nn.Linear projections) and GPT-2 (transformers' Conv1D, adapted with fan_in_fan_out)."""

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tests.integrations.conftest import needs_transformers_5  # noqa: E402

pytestmark = needs_transformers_5
peft = pytest.importorskip("peft")

import persample  # noqa: E402

VOCAB, B, T = 64, 3, 9


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel is tested elsewhere; here its PyTorch path


def _lora_model(arch, dropout):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        model, targets = transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"]
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         pad_token_id=0)
        model, targets = transformers.GPT2LMHeadModel(config), ["c_attn", "c_fc"]
    config._attn_implementation = "eager"  # SDPA's CPU kernel has no vmap batching rule
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                           fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(model, lora).double()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, where A's gradient is zero too: a test that cannot fail
            torch.nn.init.normal_(p, std=0.2)
    return model


class _Logits(torch.nn.Module):
    """ids -> logits, the form the engines take (the attention mask keeps GPT-2's padding probe out of vmap)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)  # next token, none after the last
    targets[0, :3] = -100
    return ids, targets


def _adapters(model):
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert params and all("lora_" in name for name in params)
    return params


def _reference(model, ids, targets):
    """Each sequence's gradient of its mean loss, from one batched forward (the same dropout masks as the
    engine's when the generator is seeded alike): sequences do not interact, so d loss_b / d params is
    sequence b's own gradient."""
    params = _adapters(model)
    losses = [F.cross_entropy(x, y, ignore_index=-100) for x, y in zip(model(ids), targets, strict=True)]
    grads = [torch.autograd.grad(loss, list(params.values()), retain_graph=True) for loss in losses]
    return {name: torch.stack([g[i] for g in grads]) for i, name in enumerate(params)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_clips_the_adapters_per_sequence_with_dropout(arch):
    model = _Logits(_lora_model(arch, dropout=0.3).train())
    ids, targets = _batch()
    engine = persample.GhostClipping(model, max_grad_norm=0.05)
    engine.per_sample_grad_norms(ids, targets)  # plans (one forward under no_grad), so both draws below match
    torch.manual_seed(7)
    out = engine.clipped_grad_sum(ids, targets)
    torch.manual_seed(7)
    expected = _reference(model, ids, targets)
    norms = persample.per_sample_norms(expected)
    torch.testing.assert_close(out.norms, norms, rtol=1e-8, atol=1e-10)
    assert (norms > 0.05).all()  # every sequence is clipped
    assert out.grads.keys() == expected.keys()
    for name, value in persample.clip_per_sample(expected, 0.05).items():
        torch.testing.assert_close(out.grads[name], value, rtol=1e-8, atol=1e-10, msg=name)
    # Per-example work only where the adapters are: their nn.Linear layers, each by its exact rule.
    hooked = engine._plan.modules.values()
    assert {type(h.module) for h in hooked} == {torch.nn.Linear} and all(h.rule is not None for h in hooked)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vmap_pipeline_gives_the_adapter_gradients(arch):
    model = _Logits(_lora_model(arch, dropout=0.0).eval())
    ids, targets = _batch()
    grads = persample.per_sample_grads(model, ids, targets)
    expected = _reference(model, ids, targets)
    assert grads.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-8, atol=1e-10, msg=name)
