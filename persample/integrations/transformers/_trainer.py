"""DP-SGD fine-tuning with a transformers ``Trainer``: Poisson batches, per-sequence clipping by the fast engine,
noise once per logical step, the accountant's epsilon logged and checkpointed.

How a ``Trainer`` run maps onto DP-SGD:

* **Logical batch** (one optimizer step): every training example joins independently with probability
  ``sample_rate = per_device_train_batch_size * gradient_accumulation_steps / len(train_dataset)``, so its size
  is ``Binomial(n, sample_rate)`` around the batch the arguments describe. Epoch ``e``'s batches come from
  ``PoissonSampler(n, sample_rate, steps=round(1 / sample_rate), generator=Generator().manual_seed(seed + e))``
  (``seed``: ``data_seed`` or ``seed``): a resumed run draws the same batches and skips those it trained on.
  With ``secure_mode=True`` the batches come from the OS CSPRNG instead (``PoissonSampler(secure_mode=True)``):
  not reproducible, and a resumed run draws fresh ones.
* **Physical batches**: the logical batch is cut into ``gradient_accumulation_steps`` consecutive parts, one per
  ``training_step``, and each part into slices of at most ``per_device_train_batch_size`` examples, each one
  forward and backward of :class:`persample.GhostClipping`, which clips each sequence's gradient to
  ``per_sample_max_grad_norm`` and sums.
* **Noise**: at the last part, ``p.grad = (sum of clipped gradients + N(0, (noise_multiplier * C)^2)) /
  expected batch size`` for the trainable parameters (the adapters of a peft model), then the Trainer's own
  optimizer and scheduler step as usual. The noise comes from a ``torch.Generator`` seeded with ``seed``, or with
  ``secure_mode=True`` from the OS CSPRNG (:func:`persample.add_noise`'s secure mode). The Trainer's
  ``max_grad_norm`` (clipping of that noisy mean) defaults to 0, off, here.
* **Accounting**: one Poisson-subsampled Gaussian step per optimizer step in a :class:`persample.PrivacyAccountant`;
  ``epsilon`` is logged with the loss (so to every ``report_to``), and the accountant's history and the noise
  generator's state (none in secure mode: there is no state to save) are saved in each checkpoint
  (``dp_state.pt``) and restored by ``train(resume_from_checkpoint=...)``.

A causal LM patched with :func:`persample.integrations.transformers.apply_fused_linear_cross_entropy` is clipped
without its logits as well: the engine runs the model up to its last hidden states and computes each sequence's
loss, and a trainable head's per-example norms and clipped sum, with the fused linear cross-entropy
(``GhostClipping(..., head=lm_head)``), in the patch's chunks. A trainable head tied to the input embedding
(GPT-2 fully fine-tuned) is refused there (``ValueError``): freeze it (as LoRA does) or leave the model unpatched.

Supported: causal LMs (the per-sequence loss is the mean over its next-token targets, as
:func:`persample.integrations.transformers.per_sequence_loss`) and single-label sequence classifiers (the
cross-entropy of each sequence's label), peft models around either. One process (no DDP/FSDP yet).
"""

import contextlib
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from persample.dp import PoissonSampler, PrivacyAccountant, add_noise, noise_multiplier_for
from persample.engine import GhostClipping

_STATE_FILE = "dp_state.pt"


@dataclass
class DPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` and DP-SGD's: give ``noise_multiplier`` or ``target_epsilon`` (then the noise is the
    smallest that keeps the whole run, ``max_steps`` or ``num_train_epochs``, within it at ``target_delta``).

    ``max_grad_norm`` (the Trainer's clipping of the batch gradient) defaults to 0 here: the per-example bound is
    ``per_sample_max_grad_norm``.

    Raises:
        ValueError: neither or both of ``noise_multiplier`` and ``target_epsilon``, or a
            ``per_sample_max_grad_norm`` that is not a positive finite number (besides ``TrainingArguments``' own).

    Examples:
        >>> from persample.integrations.transformers import DPTrainingArguments
        >>> args = DPTrainingArguments("dp-run", target_epsilon=8.0, per_sample_max_grad_norm=0.5, report_to=[])
        >>> args.target_delta, args.accountant, args.max_grad_norm
        (1e-05, 'rdp', 0.0)
        >>> DPTrainingArguments("dp-run", report_to=[])  # no privacy parameter given
        Traceback (most recent call last):
        ...
        ValueError: give exactly one of noise_multiplier and target_epsilon, got noise_multiplier=None, ...

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (the noise multiplier and the clipping
        bound).
    """

    per_sample_max_grad_norm: float = field(default=1.0, metadata={"help": "DP-SGD's per-sequence clipping bound C"})
    noise_multiplier: float | None = field(default=None, metadata={"help": "noise std / C; or give target_epsilon"})
    target_epsilon: float | None = field(default=None, metadata={"help": "the run's privacy budget at target_delta"})
    target_delta: float = field(default=1e-5, metadata={"help": "delta of the (epsilon, delta) guarantee"})
    accountant: str = field(default="rdp", metadata={"help": "'rdp' or 'prv' (Opacus's accountants)"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clipping of the noisy batch gradient; 0: off"})
    secure_mode: bool = field(default=False, metadata={
        "help": "draw the noise and the Poisson batches from the OS CSPRNG (not reproducible by seed)"})

    def __post_init__(self):
        super().__post_init__()
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon, got "
                             f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}")
        if not (0 < self.per_sample_max_grad_norm < math.inf):
            raise ValueError(f"per_sample_max_grad_norm must be a positive finite number, got "
                             f"{self.per_sample_max_grad_norm!r}")


class _PoissonBatches(Sampler):
    """Each Poisson logical batch of an epoch as ``parts`` consecutive index lists (some may be empty)."""

    def __init__(self, num_examples: int, sample_rate: float, parts: int, seed: int, secure_mode: bool = False):
        self.dataset_size, self.sample_rate, self.parts, self.seed = num_examples, sample_rate, parts, seed
        self.secure_mode = secure_mode
        self.steps = max(1, round(1 / sample_rate))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def logical_batches(self, epoch: int) -> list[Tensor]:
        if self.secure_mode:
            return list(PoissonSampler(self.dataset_size, self.sample_rate, steps=self.steps, secure_mode=True))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return list(PoissonSampler(self.dataset_size, self.sample_rate, steps=self.steps, generator=generator))

    def __len__(self) -> int:
        return self.steps * self.parts

    def __iter__(self):
        for batch in self.logical_batches(self.epoch):
            for part in batch.tensor_split(self.parts):
                yield part.tolist()


class _EpochLoader(DataLoader):
    """A DataLoader the Trainer can tell which epoch it is in (the batches are drawn per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class _Logits(nn.Module):
    """The model as the engine sees it: ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _Hidden(nn.Module):
    """A patched causal LM as the engine sees it: ``(input_ids, attention_mask) -> last hidden states (B, T, d)``,
    the head left to the engine's fused loss."""

    def __init__(self, model: nn.Module, body: nn.Module):
        super().__init__()
        self.model = model
        self.body = [body]  # the decoder inside ``model``, called directly (a list: not registered twice)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.body[0](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _SavePrivacyState(TrainerCallback):
    def __init__(self, trainer: "DPTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.trainer.privacy_state(), os.path.join(folder, _STATE_FILE))


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _task(model: nn.Module) -> str:
    """``"causal_lm"`` or ``"classification"``, from the transformers class (inside a peft model)."""
    name = type(_unwrap_peft(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    raise ValueError(f"DPTrainer fine-tunes causal LMs (*ForCausalLM, *LMHeadModel) and sequence classifiers "
                     f"(*ForSequenceClassification), got {name}")


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD (see the module docstring for the mapping).

    Args:
        model: a causal LM or sequence classifier, or a ``peft`` model around one (only its trainable
            parameters, e.g. the LoRA adapters, are clipped, noised and trained).
        args: :class:`DPTrainingArguments`.
        Other arguments: as ``Trainer`` (``train_dataset`` is required; ``data_collator`` must give
        ``input_ids``, ``attention_mask`` and ``labels``).

    Attributes:
        accountant: the :class:`persample.PrivacyAccountant` of the run; ``epsilon`` reads it.
        noise_generator: the seeded ``torch.Generator`` of the noise, None with ``secure_mode=True``.
        noise_multiplier, sample_rate, expected_batch_size: the run's DP-SGD parameters.

    Raises:
        TypeError: ``args`` is not a :class:`DPTrainingArguments`.
        ValueError: no ``train_dataset``, an unsupported model class, or more than one process.

    Examples:
        >>> import tempfile
        >>> import torch
        >>> import transformers
        >>> from persample.integrations.transformers import DPTrainer, DPTrainingArguments
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 64, (32, 8))
        >>> data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
        >>> output_dir = tempfile.TemporaryDirectory()
        >>> args = DPTrainingArguments(output_dir.name, per_device_train_batch_size=4,
        ...                            gradient_accumulation_steps=2, max_steps=2, target_epsilon=8.0,
        ...                            per_sample_max_grad_norm=1.0, use_cpu=True, report_to=[], save_strategy="no",
        ...                            disable_tqdm=True)
        >>> trainer = DPTrainer(model, args, train_dataset=data)  # a peft model trains its adapters only
        >>> trainer.sample_rate, trainer.expected_batch_size  # 4 * 2 of 32 examples
        (0.25, 8.0)
        >>> _ = trainer.train()  # prints the Trainer's summary of the run
        {...}
        >>> trainer.accountant.steps, 0 < trainer.epsilon <= 8.0
        (2, True)
        >>> output_dir.cleanup()

    References:
        Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD);
        Li et al., "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022 (ghost clipping);
        Yu et al., "Differentially Private Fine-tuning of Language Models", ICLR 2022 (DP LoRA).
    """

    def __init__(self, model=None, args: DPTrainingArguments | None = None, **kwargs):
        if not isinstance(args, DPTrainingArguments):
            raise TypeError(f"args must be DPTrainingArguments, got {type(args).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("DPTrainer needs a train_dataset: its size sets the sampling rate")
        if args.fp16:
            raise ValueError("DPTrainer supports bf16, not fp16: the clipped sums bypass fp16's loss scaling")
        if args.world_size > 1:
            raise ValueError(f"DPTrainer runs in one process for now, got world_size={args.world_size}")
        if args.gradient_checkpointing or getattr(self.model, "is_gradient_checkpointing", False):
            raise ValueError("DPTrainer does not support gradient checkpointing: the clipping engine records each "
                             "layer's inputs in the forward, which checkpointing recomputes in the backward. Set "
                             "gradient_checkpointing=False (and call model.gradient_checkpointing_disable())")
        self.task = _task(self.model)
        self.dataset_size = len(self.train_dataset)
        self.expected_batch_size = float(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if self.expected_batch_size > self.dataset_size:
            raise ValueError(f"per_device_train_batch_size * gradient_accumulation_steps = "
                             f"{self.expected_batch_size:g} exceeds the {self.dataset_size} training examples")
        self.sample_rate = self.expected_batch_size / self.dataset_size
        self.accountant = PrivacyAccountant(args.accountant)
        if args.noise_multiplier is not None:
            self.noise_multiplier = float(args.noise_multiplier)
        else:
            steps_per_epoch = max(1, round(1 / self.sample_rate))
            steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
            self.noise_multiplier = noise_multiplier_for(args.target_epsilon, args.target_delta, self.sample_rate,
                                                         steps=steps, accountant=args.accountant)
        # Secure mode: no seedable generator at all, so nothing predictable can reach the noise.
        self.noise_generator = None if args.secure_mode else torch.Generator().manual_seed(args.seed)
        self._engine: GhostClipping | None = None
        self._summed: dict[str, Tensor] | None = None
        self.add_callback(_SavePrivacyState(self))

    @property
    def epsilon(self) -> float:
        """The epsilon spent so far at ``target_delta``."""
        return self.accountant.epsilon(self.args.target_delta)

    def get_train_dataloader(self) -> DataLoader:
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
        except ImportError:
            collator = self._get_collator_with_removed_columns(collator, description="training")

        def collate(features):
            # An empty part of a logical batch still has every key, with zero rows.
            if not features:
                return {key: value[:0] for key, value in collator([dataset[0]]).items()}
            return collator(features)

        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batches = _PoissonBatches(self.dataset_size, self.sample_rate, self.args.gradient_accumulation_steps, seed,
                                  secure_mode=self.args.secure_mode)
        return _EpochLoader(dataset, batch_sampler=batches, collate_fn=collate,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    def _engine_for(self) -> GhostClipping:
        if self._engine is None:
            inner = _unwrap_peft(self.model)
            bound = self.args.per_sample_max_grad_norm
            if self.task == "causal_lm" and getattr(inner.forward, "_persample_fused_linear", False):
                self._engine = GhostClipping(_Hidden(self.model, inner.base_model), max_grad_norm=bound,
                                             head=inner.get_output_embeddings(),
                                             head_chunk_size=inner.forward._persample_chunk_size)
            else:
                self._engine = GhostClipping(_Logits(self.model), max_grad_norm=bound)
        return self._engine

    def _autocast(self):
        """bf16 as the arguments set it: the engine's forward (and the rules' saved inputs) under autocast."""
        if self.args.bf16:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _targets(self, inputs: dict) -> Tensor:
        labels = inputs["labels"]
        if self.task == "causal_lm":
            return F.pad(labels[:, 1:], (0, 1), value=-100)  # next token; none after the last
        return labels

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> Tensor:
        """One part of a logical batch: clipped sums in slices of ``per_device_train_batch_size``; at the last
        part, the noisy mean into ``p.grad``. Returns the part's summed loss over the expected batch size."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        engine = self._engine_for()
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        targets = self._targets(inputs)
        total = torch.zeros((), device=self.args.device)
        size = self.args.per_device_train_batch_size
        for start in range(0, len(input_ids), size):
            part = slice(start, start + size)
            with self._autocast():
                out = engine.clipped_grad_sum((input_ids[part], attention_mask[part]), targets[part])
            total += out.losses.float().sum()
            if self._summed is None:
                self._summed = {name: g.detach().clone() for name, g in out.grads.items()}
            else:
                for name, g in out.grads.items():
                    self._summed[name] += g
        if self.accelerator.sync_gradients:
            self._noisy_mean_to_grads()
        return total / self.expected_batch_size

    def _noisy_mean_to_grads(self) -> None:
        params = dict(self._engine_for().model.named_parameters())
        summed = self._summed or {name: torch.zeros_like(p) for name, p in params.items() if p.requires_grad}
        noisy = add_noise(summed, self.noise_multiplier * self.args.per_sample_max_grad_norm,
                          generator=self.noise_generator, secure_mode=self.args.secure_mode)
        for name, value in noisy.items():
            params[name].grad = (value / self.expected_batch_size).to(params[name].dtype)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._summed = None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs["epsilon"] = self.epsilon
        super().log(logs, *args, **kwargs)

    def privacy_state(self) -> dict:
        """What a checkpoint keeps: the accountant's history and the noise generator's state (None in secure
        mode, which has no generator)."""
        generator = self.noise_generator.get_state() if self.noise_generator is not None else None
        return {"history": self.accountant.history, "noise_generator": generator,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def load_privacy_state(self, state: dict) -> None:
        """Restores :meth:`privacy_state`.

        Raises:
            ValueError: the checkpoint's sample rate differs from this run's (another dataset or batch size).
        """
        if not math.isclose(state["sample_rate"], self.sample_rate):
            raise ValueError(f"the checkpoint was trained at sample_rate={state['sample_rate']}, this run has "
                             f"{self.sample_rate}: resume with the same dataset and batch arguments")
        self.accountant = PrivacyAccountant(self.args.accountant)
        for noise_multiplier, sample_rate, steps in state["history"]:
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps)
        # A secure run has no generator to restore; a seeded run resumed from a secure checkpoint keeps its seed.
        if self.noise_generator is not None and state["noise_generator"] is not None:
            self.noise_generator.set_state(state["noise_generator"])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """``Trainer.train``; resuming also restores the privacy state saved with the checkpoint.

        Raises:
            FileNotFoundError: the checkpoint has no ``dp_state.pt`` (it was not written by a DPTrainer).
        """
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in output_dir={self.args.output_dir!r}")
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, _STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: the checkpoint has no DP state to resume from")
            self.load_privacy_state(torch.load(path, weights_only=True))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
