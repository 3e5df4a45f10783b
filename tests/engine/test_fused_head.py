"""GhostClipping(head=...): a causal LM clipped from its last hidden states and the fused linear cross-entropy of its
head. In float64 the norms, losses and clipped sums equal the engine on the logits (tiny Llama and GPT-2 from
configs, nothing downloaded; trainable and frozen heads, LoRA, padding), and no op of the step makes a tensor of
the logits' size."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from persample.engine import GhostClipping

transformers = pytest.importorskip("transformers")

VOCAB, B, T = 96, 3, 8


class _Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits


class _Hidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


def _llama(vocab=VOCAB):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0)).double().eval()


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=1, attn_implementation="eager")).double().eval()  # eval: no dropout, the two paths see the
    # same network; eager attention: under transformers 4.46 the SDPA mask of a float64 GPT-2 overflows a float


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    targets = nn.functional.pad(ids[:, 1:], (0, 1), value=-100).masked_fill(mask == 0, -100)
    targets[2] = -100  # an example with no counted token: loss 0, gradient 0
    return (ids * mask, mask), targets


def _compare(model, head, max_grad_norm=0.05):
    inputs, targets = _batch()
    expected = GhostClipping(_Logits(model), max_grad_norm=max_grad_norm).clipped_grad_sum(inputs, targets)
    ours = GhostClipping(_Hidden(model), max_grad_norm=max_grad_norm, head=head,
                         head_chunk_size=T).clipped_grad_sum(inputs, targets)
    torch.testing.assert_close(ours.losses, expected.losses)
    torch.testing.assert_close(ours.norms, expected.norms)
    assert (expected.norms[:2] > max_grad_norm).all()  # the clipping acts
    assert ours.grads.keys() == expected.grads.keys()
    for name, g in expected.grads.items():
        torch.testing.assert_close(ours.grads[name], g, msg=name)
        assert g.abs().sum() > 0 or "lm_head" not in name


@pytest.mark.parametrize("frozen_head", [False, True])
def test_llama_matches_the_logits(frozen_head):
    model = _llama()
    model.lm_head.requires_grad_(not frozen_head)
    _compare(model, model.lm_head)


def test_gpt2_with_a_frozen_tied_head_and_a_bias():
    """GPT-2's head is its token embedding: frozen here; a head with a bias (untied, trainable) as well."""
    model = _gpt2()
    model.transformer.wte.requires_grad_(False)
    _compare(model, model.lm_head)

    model = _gpt2()
    model.config.tie_word_embeddings = False
    model.lm_head = nn.Linear(16, VOCAB, bias=True).double()
    _compare(model, model.lm_head)


def test_lora_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    inner = model.get_base_model()
    inputs, targets = _batch()
    view = _Hidden(inner)
    view.model = model  # the trainable parameters (names) of the peft model; its decoder called directly
    view.forward = lambda ids, mask: inner.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = GhostClipping(view, max_grad_norm=0.05, head=inner.lm_head).clipped_grad_sum(inputs, targets)
    expected = GhostClipping(_Logits(model), max_grad_norm=0.05).clipped_grad_sum(inputs, targets)
    torch.testing.assert_close(ours.norms, expected.norms)
    assert ours.grads.keys() == expected.grads.keys() and all("lora" in name for name in ours.grads)
    for name, g in expected.grads.items():
        torch.testing.assert_close(ours.grads[name], g, msg=name)


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_no_op_makes_a_tensor_of_the_logits_size():
    """Every op output of the step, the logits path's included (so the probe can fail), stays below B*T*V
    elements with head=: the head runs T rows at a time. (A larger vocabulary than the other tests': at 96 the
    body's per-example forms are larger than the logits.)"""
    vocab = 1024
    model = _llama(vocab)
    inputs, targets = _batch()
    logits_engine = GhostClipping(_Logits(model), max_grad_norm=1.0)
    head_engine = GhostClipping(_Hidden(model), max_grad_norm=1.0, head=model.lm_head, head_chunk_size=T)
    for engine in (logits_engine, head_engine):
        engine.clipped_grad_sum(inputs, targets)  # the plan's forward runs once, outside the probe
    with _LargestOutput() as probe:
        logits_engine.clipped_grad_sum(inputs, targets)
    assert probe.largest >= B * T * vocab
    with _LargestOutput() as probe:
        head_engine.clipped_grad_sum(inputs, targets)
    assert probe.largest < B * T * vocab


def test_refusals():
    model = _gpt2()  # lm_head is wte, trainable
    inputs, targets = _batch()
    with pytest.raises(ValueError, match="tied to an input embedding"):
        GhostClipping(_Hidden(model), max_grad_norm=1.0, head=model.lm_head).clipped_grad_sum(inputs, targets)
    with pytest.raises(TypeError, match="nn.Linear"):
        GhostClipping(_Hidden(model), max_grad_norm=1.0, head=model.transformer.wte)
    with pytest.raises(ValueError, match="loss_fn=None"):
        GhostClipping(_Hidden(model), max_grad_norm=1.0, head=model.lm_head, loss_fn=lambda o, t: o.sum((1, 2)))
    with pytest.raises(ValueError, match="recording"):
        with GhostClipping(_Hidden(model), max_grad_norm=1.0, head=model.lm_head).recording(inputs):
            pass
