"""persample.integrations.transformers: tiny random models built from configs (nothing is downloaded), their
loss and every parameter gradient with and without the fused loss, padding (-100) and num_items_in_batch."""

import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from persample.integrations.transformers import (  # noqa: E402
    apply_fused_loss,
    apply_fused_loss_to_class,
    causal_lm_loss,
    per_sequence_loss,
    sequence_classification_loss,
)

VOCAB, B, T = 64, 3, 9


def _llama_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0, **kw)


def _qwen2_config(**kw):
    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0, **kw)


def _gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   pad_token_id=0, **kw)


CAUSAL = {
    "llama": lambda: transformers.LlamaForCausalLM(_llama_config()),
    "gpt2": lambda: transformers.GPT2LMHeadModel(_gpt2_config()),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(_qwen2_config()),
}
CLASSIFIERS = {
    "llama": lambda **kw: transformers.LlamaForSequenceClassification(_llama_config(**kw)),
    "qwen2": lambda **kw: transformers.Qwen2ForSequenceClassification(_qwen2_config(**kw)),
}


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    # The kernel itself is tested elsewhere; here the PyTorch path of the same math keeps the models fast
    # even when the whole suite runs under TRITON_INTERPRET=1.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(factory, **kw):
    torch.manual_seed(0)
    model = factory(**kw).eval()  # eval: no dropout, so two forwards see the same function
    if "loss_function" not in inspect.unwrap(type(model).forward).__code__.co_names:
        pytest.skip(f"{type(model).__name__} computes its loss inline in transformers {transformers.__version__}")
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[2, :4] = -100  # a prompt not to be learnt
    return input_ids, attention_mask, labels


def _loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
@pytest.mark.parametrize("arch", list(CAUSAL))
def test_causal_lm_matches_unpatched_and_undoes(arch, num_items_in_batch):
    model = _model(CAUSAL[arch])
    input_ids, attention_mask, labels = _batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(num_items_in_batch)
    original = model.loss_function
    expected = _loss_and_grads(model, **inputs)
    handle = apply_fused_loss(model)
    assert model.loss_function is causal_lm_loss
    _assert_same(_loss_and_grads(model, **inputs), expected)
    handle.remove()
    assert model.loss_function is original
    handle.remove()  # idempotent


def test_causal_lm_shift_labels_and_half_precision():
    logits = torch.randn(B, T, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    labels = _batch()[2]
    from transformers.loss.loss_utils import ForCausalLMLoss

    for kwargs in ({}, {"shift_labels": F.pad(labels[:, 1:], (0, 1), value=-100)}, {"num_items_in_batch": 11}):
        ours = causal_lm_loss(logits, labels, VOCAB, **kwargs)
        (grad,) = torch.autograd.grad(ours, logits)
        ref = ForCausalLMLoss(logits, labels, VOCAB, **kwargs)
        (ref_grad,) = torch.autograd.grad(ref, logits)
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_sequence_classification_matches_unpatched(arch):
    model = _model(CLASSIFIERS[arch], num_labels=5)
    input_ids, attention_mask, _ = _batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=torch.tensor([4, 0, 2]))
    expected = _loss_and_grads(model, **inputs)
    with apply_fused_loss(model):
        assert model.loss_function is sequence_classification_loss
        _assert_same(_loss_and_grads(model, **inputs), expected)
    assert model.config.problem_type == "single_label_classification"


@pytest.mark.parametrize(("num_labels", "labels"), [
    (1, torch.tensor([0.5, -1.0, 2.0])),  # regression
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),  # multi-label
])
def test_other_classification_problems_are_left_to_transformers(num_labels, labels):
    model = _model(CLASSIFIERS["llama"], num_labels=num_labels)
    input_ids, attention_mask, _ = _batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = _loss_and_grads(model, **inputs)
    model.config.problem_type = None
    with apply_fused_loss(model):
        _assert_same(_loss_and_grads(model, **inputs), expected)


def test_class_patch_applies_to_new_instances_and_undoes():
    input_ids, attention_mask, labels = _batch()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    expected = _loss_and_grads(_model(CAUSAL["llama"]), **inputs)
    handle = apply_fused_loss_to_class(transformers.LlamaForCausalLM)
    try:
        model = _model(CAUSAL["llama"])
        assert model.loss_function is causal_lm_loss
        _assert_same(_loss_and_grads(model, **inputs), expected)
        with pytest.raises(ValueError, match="already"):
            apply_fused_loss(model)
        with pytest.raises(ValueError, match="already"):
            apply_fused_loss_to_class(transformers.LlamaForCausalLM)
    finally:
        handle.remove()
    assert "loss_function" not in vars(transformers.LlamaForCausalLM)
    assert model.loss_function is not causal_lm_loss


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply_fused_loss(torch.nn.Linear(2, 2))
    gpt2_classifier = transformers.GPT2ForSequenceClassification(_gpt2_config(num_labels=3))
    with pytest.raises(ValueError, match="without self.loss_function"):  # in 4.46 and 5.x alike
        apply_fused_loss(gpt2_classifier)
    model = _model(CAUSAL["llama"])
    apply_fused_loss(model)
    with pytest.raises(ValueError, match="already"):
        apply_fused_loss(model)


@pytest.mark.parametrize("shift", [True, False])
def test_per_sequence_loss(shift, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # back to the suite's setting: the kernel if interpreting
    logits = torch.randn(B, T, VOCAB, dtype=torch.float64)
    labels = _batch()[2]
    labels[0] = -100  # a sequence with nothing to learn
    ours = per_sequence_loss(logits, labels, shift=shift)
    aligned = F.pad(labels[:, 1:], (0, 1), value=-100) if shift else labels
    for i in range(B):
        counted = aligned[i] != -100
        expected = F.cross_entropy(logits[i][counted], aligned[i][counted]) if counted.any() else torch.tensor(0.0)
        torch.testing.assert_close(ours[i], expected.double())
    # DP-style per-example gradients: vmap over the examples of the gradient of each one's loss.
    per_example = torch.func.vmap(torch.func.grad(lambda x, y: per_sequence_loss(x, y, shift=shift)))(logits, labels)
    for i in range(B):
        x = logits[i].clone().requires_grad_()
        per_sequence_loss(x, labels[i], shift=shift).backward()
        torch.testing.assert_close(per_example[i], x.grad)


def test_per_example_gradients_of_a_model_under_vmap():
    """What DP-SGD needs from a transformers model: each example's gradient of its per_sequence_loss, here
    with torch.func over the examples, equal to one backward per example."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config(attn_implementation="eager")).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    input_ids, _, labels = _batch()  # right padding is masked by the labels; causal attention never sees it

    def loss_of_one(p, ids, y):
        logits = torch.func.functional_call(model, p, (ids[None],)).logits
        return per_sequence_loss(logits, y[None])[0]

    per_example = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, 0, 0))(params, input_ids, labels)
    for i in range(B):
        model.zero_grad(set_to_none=True)
        per_sequence_loss(model(input_ids[i:i + 1]).logits, labels[i:i + 1])[0].backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_linear_cross_entropy_on_a_model_head_matches_its_loss():
    """The README recipe: run the decoder, then the head and loss together, so the logits never exist."""
    from persample import linear_cross_entropy

    model = _model(CAUSAL["llama"])
    input_ids, attention_mask, labels = _batch()
    expected = _loss_and_grads(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss = linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, labels[:, 1:], chunk_size=7)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _assert_same((loss.detach(), grads), expected)


class _Logits(torch.nn.Module):
    """A transformers causal LM as a plain ``ids -> logits`` module, the form the DP engine takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_dp_engine_covers_the_layers(name):
    """GhostClipping on a tiny transformers LM (Linear or GPT-2's Conv1D, Embedding incl. ``position_ids`` of
    shape (1, T), RMSNorm/LayerNorm, attention) gives the same per-sequence norms and clipped sum as one
    backward per sequence."""
    import persample

    torch.manual_seed(0)
    config = {"llama": _llama_config, "qwen2": _qwen2_config, "gpt2": _gpt2_config}[name]()
    config._attn_implementation = "eager"  # SDPA's CPU kernel has no vmap batching rule (the fallback needs one)
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "gpt2": transformers.GPT2LMHeadModel}[name]
    model = _Logits(model_class(config).double().eval())
    ids = torch.randint(1, VOCAB, (B, T))
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], 1)  # next token, none after the last
    targets[0, :3] = -100
    out = persample.GhostClipping(model, max_grad_norm=0.5).clipped_grad_sum(ids, targets)
    # Reference: one ordinary backward per example (GPT-2's forward does not run under vmap).
    params = dict(model.named_parameters())
    per_example = [torch.autograd.grad(F.cross_entropy(model(ids[b:b + 1])[0], targets[b], ignore_index=-100),
                                       list(params.values())) for b in range(B)]
    grads = {name: torch.stack([g[i] for g in per_example]) for i, name in enumerate(params)}
    torch.testing.assert_close(out.norms, persample.per_sample_norms(grads), rtol=1e-8, atol=1e-10)
    expected = persample.clip_per_sample(grads, 0.5)
    for key, value in expected.items():
        torch.testing.assert_close(out.grads[key], value, rtol=1e-8, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")
