"""apply_fused_linear_cross_entropy: causal LMs whose training loss never holds the (B, T, V) logits. Tiny random
models from configs (nothing downloaded): loss and every parameter gradient against the unpatched model, per
dtype, with padding (-100), num_items_in_batch, shift_labels and autocast; the saved tensors of the step; undo."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.integrations.conftest import needs_transformers_5  # noqa: E402

pytestmark = needs_transformers_5

from persample.integrations.transformers import apply_fused_linear_cross_entropy  # noqa: E402

VOCAB, B, T, WIDTH = 256, 3, 9, 32  # V above the MLP width 4d: the logits are the largest activation

CONFIGS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)),
}
# Relative tolerances of the loss and the gradients against the unpatched model in the same dtype: float32 differs
# in the summation order only; in bfloat16 both round the logits to bfloat16 and the hidden states' gradient
# (whose rounding each path does at a different point), so a few bfloat16 ulps.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel is tested elsewhere; here its PyTorch path


def _model(arch, dtype=torch.float32):
    torch.manual_seed(0)
    return CONFIGS[arch]().to(dtype).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :4] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ours, expected, dtype):
    (out, grads), (ref, ref_grads) = ours, expected
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, **TOLERANCES[dtype])
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grad / scale, ref_grads[name] / scale, **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_matches_unpatched_and_undoes(arch, dtype):
    model = _model(arch, dtype)
    inputs = _batch()
    expected = _loss_and_grads(model, **inputs)
    forward = model.forward
    with apply_fused_linear_cross_entropy(model) as handle:
        out, grads = _loss_and_grads(model, **inputs)
        assert out.logits is None
        _assert_same((out, grads), expected, dtype)
        # Without labels the model runs as before and gives its logits.
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(logits, expected[0].logits)
    assert "forward" not in vars(model) and model.forward == forward
    handle.remove()  # idempotent


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_options_and_tuples(arch):
    model = _model(arch)
    inputs = _batch()
    shifted = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    cases = [dict(num_items_in_batch=torch.tensor(40)), dict(num_items_in_batch=11),
             dict(shift_labels=shifted)]
    for case in cases:
        kwargs = {**inputs, **case}
        expected = _loss_and_grads(model, **kwargs)
        with apply_fused_linear_cross_entropy(model, chunk_size=5):
            _assert_same(_loss_and_grads(model, **kwargs), expected, torch.float32)
            loss, *rest = model(**kwargs, return_dict=False)
            torch.testing.assert_close(loss, expected[0].loss)
            assert all(x is None or x.shape[-1] != VOCAB for x in rest if torch.is_tensor(x))


def test_autocast_matches_unpatched():
    """Trainer's bf16=True: float32 weights under autocast; the head runs in bfloat16 either way."""
    model = _model("llama")
    inputs = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _loss_and_grads(model, **inputs)
        with apply_fused_linear_cross_entropy(model):
            ours = _loss_and_grads(model, **inputs)
    _assert_same(ours, expected, torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_step_saves_no_logits(arch):
    """No tensor the size of the logits (or a float32 copy) is saved for the backward: the loss side keeps the
    hidden states and their gradient, (B, T, d). The unpatched model does save logits, so the probe can fail."""
    model = _model(arch)
    inputs = _batch()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_sizes():
        sizes = [0]

        def pack(x):
            if x.untyped_storage().data_ptr() not in weights:  # views of the weights cost nothing
                sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model(**inputs).loss.backward()
        return sizes

    assert max(saved_sizes()) >= B * T * VOCAB
    with apply_fused_linear_cross_entropy(model):
        assert max(saved_sizes()) < B * T * VOCAB


def test_peft_model_and_errors():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    inputs = _batch()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    expected = _loss_and_grads(lora, **inputs)
    with apply_fused_linear_cross_entropy(lora):
        _assert_same(_loss_and_grads(lora, **inputs), expected, torch.float32)
        with pytest.raises(ValueError, match="already"):
            apply_fused_linear_cross_entropy(lora)

    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_fused_linear_cross_entropy(torch.nn.Linear(2, 2))
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="Gemma2ForCausalLM is not supported"):
        apply_fused_linear_cross_entropy(gemma)
    headed = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_fused_linear_cross_entropy(headed)
