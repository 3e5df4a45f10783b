"""DPTrainer: a tiny Llama from a config fine-tuned for a few steps. With the noise off its parameters equal a
hand-written loop of persample's engine on the same Poisson batches; the logged epsilon is the accountant's; a
run resumed from a checkpoint mid-run ends with the same epsilon and parameters; LoRA trains the adapters only."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.integrations.conftest import needs_transformers_5  # noqa: E402

pytestmark = needs_transformers_5

import persample  # noqa: E402
from persample.integrations.transformers import DPTrainer, DPTrainingArguments  # noqa: E402

VOCAB, N, T = 48, 20, 8
BATCH, PARTS = 3, 2  # per_device_train_batch_size, gradient_accumulation_steps: expected logical batch 6


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel is tested elsewhere; here its PyTorch path


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _dataset():
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(N):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = torch.ones(T, dtype=torch.long)
        mask[T - i % 3:] = 0  # right padding of 0 to 2 tokens
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def _collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=PARTS,
                max_steps=4, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                per_sample_max_grad_norm=0.1, seed=5, report_to=[], logging_steps=1, save_strategy="no",
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return DPTrainingArguments(**{**base, **kw})


def _trainer(tmp_path, model=None, **kw):
    return DPTrainer(model or _model(), _args(tmp_path, **kw), train_dataset=_dataset(), data_collator=_collate)


def _hand_loop(trainer, steps):
    """persample's engine and noise-free DP-SGD by hand, on the batches the trainer's sampler draws."""
    model = _model().train()
    data = _collate(_dataset())
    view = torch.nn.Module()
    view.forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    view.model = model
    engine = persample.GhostClipping(view, max_grad_norm=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = trainer.get_train_dataloader().batch_sampler
    batches = [b for epoch in range(math.ceil(steps / sampler.steps)) for b in sampler.logical_batches(epoch)]
    targets = torch.nn.functional.pad(data["labels"][:, 1:], (0, 1), value=-100)
    assert any(len(b) > BATCH * PARTS for b in batches[:steps])  # a part of more than one slice is exercised
    for idx in batches[:steps]:
        summed = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        for part in idx.tensor_split(PARTS):
            for chunk in part.split(BATCH):
                out = engine.clipped_grad_sum((data["input_ids"][chunk], data["attention_mask"][chunk]),
                                              targets[chunk])
                for name, g in out.grads.items():
                    summed[name.removeprefix("model.")] += g
        for name, p in model.named_parameters():
            p.grad = summed[name] / (BATCH * PARTS)
        optimizer.step()
    return model


def test_noise_free_run_equals_the_engine_by_hand(tmp_path):
    trainer = _trainer(tmp_path, noise_multiplier=0.0)
    trainer.train()
    expected = _hand_loop(trainer, 4)
    for (name, p), q in zip(trainer.model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.accountant.steps == 4 and trainer.sample_rate == BATCH * PARTS / N


def test_epsilon_is_logged_and_resume_gives_the_same_run(tmp_path):
    full = _trainer(tmp_path / "full", noise_multiplier=1.0)
    full.train()
    logged = [entry["epsilon"] for entry in full.state.log_history if "loss" in entry]
    assert logged == [persample.epsilon_for(1.0, 1e-5, full.sample_rate, step) for step in range(1, 5)]
    assert full.epsilon == logged[-1]

    first = _trainer(tmp_path / "resumed", noise_multiplier=1.0, save_strategy="steps", save_steps=2, max_steps=2)
    first.train()
    resumed = _trainer(tmp_path / "resumed", noise_multiplier=1.0)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.accountant.history == full.accountant.history and resumed.epsilon == full.epsilon
    for (name, p), q in zip(resumed.model.named_parameters(), full.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_target_epsilon_sets_the_noise(tmp_path):
    trainer = _trainer(tmp_path, target_epsilon=3.0, max_steps=10)
    expected = persample.noise_multiplier_for(3.0, 1e-5, BATCH * PARTS / N, steps=10)
    assert trainer.noise_multiplier == expected


def test_lora_trains_the_adapters_only_in_bf16(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          lora_dropout=0.1))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer(tmp_path, model=model, noise_multiplier=0.5, max_steps=2, bf16=True)
    trainer.train()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert all(not torch.equal(params[name], value) for name, value in adapters.items() if "lora_B" in name)
    assert math.isfinite(trainer.state.log_history[-2]["loss"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        DPTrainingArguments(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="DPTrainingArguments"):
        DPTrainer(_model(), transformers.TrainingArguments(str(tmp_path)), train_dataset=_dataset())
    classifier = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GPT2Model"):
        _trainer(tmp_path, model=classifier, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        _trainer(tmp_path, noise_multiplier=1.0, gradient_checkpointing=True)
    checkpointed = _model()
    checkpointed.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        _trainer(tmp_path, model=checkpointed, noise_multiplier=1.0)


def test_sequence_classifier_is_clipped_per_sequence(tmp_path):
    """A classifier's per-sequence loss is the cross-entropy of its label: one noise-free step equals the
    engine by hand on the same Poisson batch."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, num_labels=3)
    model = transformers.LlamaForSequenceClassification(config)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [{**row, "labels": torch.tensor(i % 3)} for i, row in enumerate(_dataset())]
    trainer = DPTrainer(model, _args(tmp_path, noise_multiplier=0.0, max_steps=1), train_dataset=rows,
                        data_collator=_collate)
    idx = trainer.get_train_dataloader().batch_sampler.logical_batches(0)[0]
    trainer.train()

    reference = transformers.LlamaForSequenceClassification(config)
    reference.load_state_dict(start)
    data = _collate(rows)
    view = torch.nn.Module()
    view.model = reference
    view.forward = lambda ids, mask: reference(input_ids=ids, attention_mask=mask).logits
    summed = None
    for part in idx.tensor_split(PARTS):
        for chunk in part.split(BATCH):
            out = persample.GhostClipping(view, max_grad_norm=0.1).clipped_grad_sum(
                (data["input_ids"][chunk], data["attention_mask"][chunk]), data["labels"][chunk])
            summed = out.grads if summed is None else {k: summed[k] + v for k, v in out.grads.items()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, start[name] - 0.5 * summed["model." + name] / (BATCH * PARTS), rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_secure_mode_draws_from_the_os_and_resumes(tmp_path, monkeypatch):
    """secure_mode: no seeded generator exists, the noise and the batches read os.urandom (32 bytes per noise
    value, 8 per example per batch), two runs with one seed differ, and a resumed run keeps the epsilon."""
    import os

    drawn = []
    urandom = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: drawn.append(n) or urandom(n))
    trainer = _trainer(tmp_path / "a", noise_multiplier=1.0, max_steps=2, secure_mode=True)
    assert trainer.noise_generator is None
    trainer.train()
    numel = sum(p.numel() for p in trainer.model.parameters())
    batches = drawn.count(8 * N)  # the epoch's Poisson batches, 8 bytes per example each
    assert batches >= 2 and sum(drawn) - 8 * N * batches == 2 * 32 * numel  # each step's noise: 32 bytes a value
    other = _trainer(tmp_path / "b", noise_multiplier=1.0, max_steps=2, secure_mode=True)
    other.train()
    assert not torch.equal(next(trainer.model.parameters()), next(other.model.parameters()))

    first = _trainer(tmp_path / "c", noise_multiplier=1.0, max_steps=2, secure_mode=True, save_strategy="steps",
                     save_steps=2)
    first.train()
    state = torch.load(tmp_path / "c" / "checkpoint-2" / "dp_state.pt", weights_only=True)
    assert state["noise_generator"] is None
    resumed = _trainer(tmp_path / "c", noise_multiplier=1.0, secure_mode=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-2"))
    assert resumed.accountant.steps == 4
    assert resumed.epsilon == persample.epsilon_for(1.0, 1e-5, resumed.sample_rate, 4)


@pytest.mark.parametrize("lora", [False, True])
def test_no_logits_patch_gives_the_same_run(tmp_path, lora):
    """A model patched with apply_fused_linear_cross_entropy is clipped by the engine from its hidden states and
    the fused head (the trainable head's norms from linear_cross_entropy_head_grad_norms): noise-free, the run
    equals the unpatched one, full fine-tuning and LoRA."""
    from persample.integrations.transformers import apply_fused_linear_cross_entropy

    peft = pytest.importorskip("peft") if lora else None
    runs = []
    for patched in (False, True):
        model = _model()
        if lora:
            model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
        if patched:
            apply_fused_linear_cross_entropy(model, chunk_size=T)
        trainer = _trainer(tmp_path / str(patched), model=model, noise_multiplier=0.0, max_steps=2)
        start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        trainer.train()
        assert all(not torch.equal(p, start[name]) for name, p in model.named_parameters() if "lora_B" in name
                   or (not lora and name == "lm_head.weight"))
        inner = model.get_base_model() if lora else model
        assert (trainer._engine_for().head is inner.lm_head) == patched
        runs.append(trainer.model)
    for (name, p), q in zip(runs[1].named_parameters(), runs[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
