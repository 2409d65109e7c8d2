"""The training loop shared by every model family.

``Trainer.fit`` runs mini-batch training of any model that provides ``module`` (a torch
module) and ``loss(batch, generator) -> Tensor`` (the mean per-shower loss to minimise; for
flows the negative log-likelihood). Adversarial models instead declare several *players*
(``players()``: name -> (parameters, learning-rate factor, Adam betas), each with its own
optimiser), which players update at each step (``player_schedule(step)``) and each
player's loss (``player_loss(name, batch, generator)``); a model may also select epochs by
a figure computed on the whole validation set (``validation_metric(tensors, device)``,
lower is better) instead of the mean validation loss. The loop provides:

* a validation split, AdamW, a one-cycle learning-rate schedule (warm-up then cosine decay,
  driven by the fraction of steps or of the time budget done), gradient clipping;
* a non-finite guard: a step whose loss or gradient is not finite is skipped and counted;
  a non-finite validation loss restores the best weights; too many in a row stop training
  with a clear message;
* selection by validation loss: ``on_best`` (usually ``model.save``) runs whenever it improves;
* a checkpoint after every epoch (``checkpoint.safetensors``: weights, optimiser state, the
  best weights, RNG state, and the loop state as JSON metadata, in one atomic file), so a
  killed run resumed with ``resume=True`` loses at most the epoch in progress and continues
  exactly (same batches, same noise);
* a progress bar with loss and ETA, ``train_log.jsonl`` (one line per epoch) and
  ``loss_curve.png`` in the run directory;
* training data in memory (a batch dict, :class:`TensorBatches`) or read block by block
  from a file (:class:`StreamedBatches`); ``epoch_showers`` cuts a long pass over a large
  set into several epochs (validation, checkpoint and time-budget check after each);
* ``micro_batch_size``: a batch's gradient accumulated over micro-batches (one optimiser
  step, the memory of one micro-batch);
* data-parallel training under ``torchrun`` (:mod:`caloforge.distributed`): each process
  trains on its own fixed share of the training set with ``batch_size`` showers per step,
  the gradients are averaged over the processes before every optimiser step (so the
  weights stay the same everywhere; a step holds ``batch_size`` × processes showers),
  validation is summed over the processes, and only rank 0 writes the checkpoint, the
  log, the plots and the model.

No global state: every random number comes from generators seeded by (seed, epoch).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch

from . import distributed
from .atomic import atomic_output
from .data import ShowerData, ShowerStream
from .errors import CaloforgeError, OptionError
from .runtime import get_logger, parse_quantity, stop_if_terminated

log = get_logger("training")
CHECKPOINT = "checkpoint.safetensors"
TRAIN_LOG = "train_log.jsonl"


@dataclass
class TrainingConfig:
    """Optimisation settings (all overridable from a YAML config's ``training:`` section)."""

    epochs: int = 50
    time_budget_s: float | None = None
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    grad_clip: float = 5.0
    val_fraction: float = 0.1
    warmup_fraction: float = 0.3
    seed: int = 0
    max_nonfinite_in_a_row: int = 50
    # "one-cycle" (warm-up then cosine decay) or "constant" (the usual choice for GANs)
    schedule: str = "one-cycle"
    # Showers per epoch; None: the whole training set. A large set split into epochs of
    # this size is validated, checkpointed and checked against the time budget more often
    # (each pass over the data is still one shuffled permutation, cut into parts).
    epoch_showers: int | None = None
    # Showers per forward/backward pass; None: the whole batch. Smaller micro-batches
    # accumulate their gradients into one optimiser step over ``batch_size`` showers (the
    # same step, in less memory).
    micro_batch_size: int | None = None

    def validate(self) -> None:
        if self.epochs < 1:
            raise OptionError(f"epochs must be >= 1, got {self.epochs}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise OptionError("the time budget must be positive")
        if self.batch_size < 1 or self.learning_rate <= 0 or self.grad_clip <= 0:
            raise OptionError("batch size, learning rate and gradient clip must be positive")
        if not 0 < self.val_fraction < 0.5:
            raise OptionError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.schedule not in ("one-cycle", "constant"):
            raise OptionError(f"schedule must be one-cycle or constant, got {self.schedule!r}")
        if self.epoch_showers is not None and self.epoch_showers < 1:
            raise OptionError(f"epoch_showers must be >= 1, got {self.epoch_showers}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise OptionError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")

    def parts_per_pass(self, n_train: int) -> int:
        """Epochs per pass over ``n_train`` training showers."""
        return 1 if self.epoch_showers is None else max(1, math.ceil(n_train / self.epoch_showers))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        return config_from_dict(cls, values, "training")


def config_from_dict(config_class: Any, values: dict[str, Any], what: str) -> Any:
    """A config dataclass from (partial) options merged onto its defaults: unknown keys
    refused with an OptionError naming them, nested config sections (dataclasses such as
    ``training:`` or a flow's) merged section by section, scalars cast to the type of the
    default (a None default takes the value as given; a switch only true or false). Every
    family's config and the distillation config are read by this one function."""
    check_known_options(config_class, values, what)
    out = config_class()
    for name, value in values.items():
        current = getattr(out, name)
        try:
            if is_dataclass(current) and not isinstance(current, type):
                value = config_from_dict(type(current), {**asdict(current), **(value or {})},
                                         f"{what} {name}")
            elif isinstance(current, bool):
                # bool("false") is True: a switch takes true or false only
                if not isinstance(value, bool):
                    raise TypeError(f"expected true or false, got {value!r}")
            elif value is not None and current is not None:
                value = type(current)(value)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"bad {what} option {name}: {exc}") from None
        setattr(out, name, value)
    return out


def check_known_options(config_class: Any, values: dict[str, Any], what: str) -> None:
    """Raise an OptionError naming any key of ``values`` that is not a field of the
    dataclass ``config_class``."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")


# A player: the parameters one optimiser updates, its learning-rate factor (times the
# scheduled rate) and its Adam betas.
Player = tuple[list[torch.nn.Parameter], float, tuple[float, float]]
DEFAULT_BETAS = (0.9, 0.999)


class TrainingHooks:
    """The model contract of the :class:`Trainer`: what it calls on a model, with defaults.

    A model provides ``module`` (its ``torch.nn.Module``) and ``loss``; every other hook has
    a documented default that a family overrides only where it differs (the Trainer never
    asks whether a hook exists):

    * one optimiser over all parameters (``players``), stepped at every step
      (``player_schedule``) on ``loss`` (``player_loss``): adversarial families declare a
      critic and a generator instead;
    * epochs selected by the mean ``validation_loss`` (by default ``loss`` with fixed
      noise) over batches of ``validation_batch_size``, or by ``validation_metric`` of the
      whole validation set where it returns a figure;
    * ``on_best`` when the validation figure improves, ``on_epoch_end`` after each epoch's
      checkpoint (diagnostic plots), ``end_fit`` after training; all do nothing by default.

    Batches are dicts of tensors (``incident_energy`` ``(B,)`` MeV, ``voxels``
    ``(B, n_voxels)`` MeV, ``condition.<name>`` ``(B, k)``) on the training device.
    """

    module: Any  # torch.nn.Module; Any: families hold None until the module is built
    # the y-axis label of the validation figure in loss plots and messages (None: the loss)
    validation_label: ClassVar[str | None] = None
    # True where ``validation_metric`` needs the whole validation set in memory
    validates_in_memory: ClassVar[bool] = False
    # families that train from a ShowerStream block by block (files larger than memory);
    # the others read a stream into memory first
    streams_training_data: ClassVar[bool] = False
    # streamed training fits the preprocessing on a subsample of at most this many voxel
    # values (float32: 4 bytes each), plus the conditions of every training shower
    preprocessing_sample_values: ClassVar[int] = 250_000_000

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The mean per-shower loss to minimise (flows: negative log-likelihood, nats);
        every random number from ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def players(self) -> dict[str, Player]:
        """Name -> (parameters, learning-rate factor, Adam betas), one optimiser each.
        Default: one player, ``"model"``, with every parameter of ``module``."""
        return {"model": (list(self.module.parameters()), 1.0, DEFAULT_BETAS)}

    def player_schedule(self, step: int) -> tuple[str, ...]:
        """The players updated at optimiser step ``step`` (default: all, in order)."""
        return tuple(self.players())

    def player_loss(self, name: str, batch: dict[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        """Player ``name``'s loss on ``batch`` (default: ``loss``)."""
        return self.loss(batch, generator)

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                        ) -> torch.Tensor:
        """The figure averaged over the validation set, lower is better (default: ``loss``;
        a distilled student uses its KL divergence from the teacher)."""
        return self.loss(batch, generator)

    def validation_batch_size(self, training_batch_size: int) -> int:
        """Showers per validation batch (default: the training batch, at least 1024)."""
        return max(training_batch_size, 1024)

    def validation_metric(self, tensors: dict[str, torch.Tensor], device: str
                          ) -> float | None:
        """A figure of the whole validation set (lower is better), or None (default) to
        select epochs by the mean ``validation_loss``."""
        return None

    def on_best(self, run_dir: str, state: LoopState) -> None:
        """Called when the validation figure improves (e.g. save the model)."""

    def on_epoch_end(self, run_dir: str, record: dict[str, Any]) -> None:
        """Called after each epoch's checkpoint with its ``train_log.jsonl`` record."""

    def end_fit(self, data: ShowerData | ShowerStream, run_dir: str) -> None:
        """Called after training (best weights loaded), before the model is saved: e.g. fit
        a post-processing step on the training data."""


def learning_rate(config: TrainingConfig, progress: float) -> float:
    if config.schedule == "constant":
        return config.learning_rate
    return one_cycle_lr(config.learning_rate, progress, config.warmup_fraction)


def one_cycle_lr(base_lr: float, progress: float, warmup: float) -> float:
    """Learning rate at ``progress`` in [0, 1]: linear warm-up from base/25, cosine to base/1e4."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr / 25 + (base_lr - base_lr / 25) * progress / warmup
    phase = (progress - warmup) / max(1 - warmup, 1e-9)
    return base_lr / 1e4 + (base_lr - base_lr / 1e4) * 0.5 * (1 + math.cos(math.pi * phase))


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1.5h``."""
    return parse_quantity(text, {"s": 1, "m": 60, "h": 3600}, "duration", "90s, 30m, 1.5h")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible (train, validation) index split."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 999])).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class TensorBatches:
    """Mini-batches of a batch dict held in memory (``name -> (N, ...)`` tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batches(self, batch_size: int, generator: torch.Generator | None, part: int = 0,
                parts: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled by ``generator`` (in order without one); ``part`` of ``parts`` equal
        slices of the shuffled order."""
        if parts == 1:
            yield from _slices(self.tensors, batch_size, generator)
            return
        everything = torch.arange(len(self)) if generator is None else torch.randperm(
            len(self), generator=generator)
        order = _part(everything, part, parts)
        yield from _slices({k: v[order] for k, v in self.tensors.items()}, batch_size, None)


class StreamedBatches:
    """Mini-batches read block by block from a :class:`~caloforge.data.ShowerStream`.

    An epoch visits the blocks in an order drawn from the generator and shuffles the
    showers inside a buffer of ``buffer_blocks`` blocks, so memory holds a few blocks,
    whatever the file size. Without a generator (validation) blocks come in order.
    ``to_tensors`` turns a :class:`~caloforge.data.ShowerData` into a batch dict.
    """

    def __init__(self, stream: ShowerStream, blocks: np.ndarray,
                 to_tensors: Callable[[ShowerData], dict[str, torch.Tensor]],
                 buffer_blocks: int = 4) -> None:
        self.stream, self.blocks, self.to_tensors = stream, np.asarray(blocks), to_tensors
        self.buffer_blocks = max(1, buffer_blocks)

    def __len__(self) -> int:
        return self.stream.count(self.blocks)

    def batches(self, batch_size: int, generator: torch.Generator | None, part: int = 0,
                parts: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled by ``generator`` (in order without one); ``part`` of ``parts`` equal
        slices of the shuffled block order."""
        order = self.blocks if generator is None else self.blocks[
            torch.randperm(len(self.blocks), generator=generator).numpy()]
        order = _part(order, part, parts)
        carry: dict[str, torch.Tensor] | None = None
        for first in range(0, len(order), self.buffer_blocks):
            loaded = [self.to_tensors(self.stream.read_block(int(b)))
                      for b in order[first:first + self.buffer_blocks]]
            buffer = {k: torch.cat([p[k] for p in loaded]) for k in loaded[0]}
            if generator is not None:
                shuffle = torch.randperm(len(next(iter(buffer.values()))), generator=generator)
                buffer = {k: v[shuffle] for k, v in buffer.items()}
            if carry is not None:
                buffer = {k: torch.cat([carry[k], v]) for k, v in buffer.items()}
            n = len(next(iter(buffer.values())))
            full = n - n % batch_size
            yield from _slices({k: v[:full] for k, v in buffer.items()}, batch_size, None)
            carry = {k: v[full:] for k, v in buffer.items()} if full < n else None
        if carry is not None:
            yield carry


BatchSource = TensorBatches | StreamedBatches


def _part(order: Any, part: int, parts: int) -> Any:
    """Slice ``part`` of ``parts`` near-equal consecutive slices of ``order``."""
    n = len(order)
    return order[part * n // parts:(part + 1) * n // parts]


def _slices(tensors: dict[str, torch.Tensor], batch_size: int,
            generator: torch.Generator | None) -> Iterator[dict[str, torch.Tensor]]:
    n = len(next(iter(tensors.values())))
    order = torch.randperm(n, generator=generator) if generator is not None else None
    for start in range(0, n, batch_size):
        if order is None:
            yield {k: v[start:start + batch_size] for k, v in tensors.items()}
        else:
            yield {k: v[order[start:start + batch_size]] for k, v in tensors.items()}


def _accumulate_gradients(loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                          batch: dict[str, torch.Tensor], micro_batch_size: int | None
                          ) -> torch.Tensor:
    """Backpropagate the batch's mean loss, in micro-batches of ``micro_batch_size``
    showers (each weighted by its share of the batch) so that only one micro-batch's
    activations are held at a time. Returns the (detached) batch loss; a non-finite loss
    stops before its backward pass and is returned as it is."""
    n = len(next(iter(batch.values())))
    step = micro_batch_size or n
    total = torch.zeros(())
    for start in range(0, n, step):
        part = batch if step >= n else {k: v[start:start + step] for k, v in batch.items()}
        loss = loss_of(part) * (min(step, n - start) / n)
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()
        total = total + loss.detach().cpu()
    return total


@dataclass
class LoopState:
    """Where a training run stands; checkpointed after every epoch (as JSON), so a resumed
    run continues exactly."""

    epoch: int = 0            # epochs done
    step: int = 0             # optimiser steps done (all players of one step count once)
    elapsed_s: float = 0.0    # training time of the epochs done, validation included
    best_val: float | None = None
    best_epoch: int = 0
    skipped_steps: int = 0    # steps whose loss or gradient was not finite
    restores: int = 0         # best weights restored after a non-finite validation figure
    world_size: int = 1       # processes of the run (a resumed run may change it)
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class EpochResult:
    """What one epoch's training steps produced (before validation)."""

    player_losses: dict[str, list[float]]
    learning_rate: float
    ended_by_time_budget: bool


class Trainer:
    """Runs the loop for one model in one run directory (see the module docstring).

    ``fit`` = set-up, then per epoch ``train_epoch`` (``train_step`` per batch) and
    ``end_epoch`` (validation, selection, checkpoint, log, hooks) until the epochs or the
    time budget are done."""

    def __init__(self, model: TrainingHooks, config: TrainingConfig, run_dir: str,
                 device: str = "cpu", progress: Callable[..., Any] | None = None) -> None:
        config.validate()
        self.model, self.config, self.run_dir = model, config, run_dir
        self.device = device
        self.progress = progress
        self.log_path = os.path.join(run_dir, TRAIN_LOG)
        self.consecutive_bad_steps = 0
        self.world = distributed.current_world()
        if self.world.is_main:
            os.makedirs(run_dir, exist_ok=True)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def evaluate(self, source: BatchSource) -> float:
        """The model's ``validation_metric`` of the whole set where it gives one, else the
        mean ``validation_loss`` over ``source`` with fixed noise (seeded); no gradients."""
        self.model.module.eval()
        if self.model.validates_in_memory and not isinstance(source, TensorBatches):
            raise CaloforgeError("this model family validates in memory: train it "
                                 "without streaming")
        with torch.no_grad():
            if isinstance(source, TensorBatches):
                # a figure of the whole set: computed once, by rank 0, for every process
                metric = distributed.from_main(self.model.validation_metric, source.tensors,
                                               self.device)
                if metric is not None:
                    return float(metric)
            # each process its share of the set, summed over the processes
            world = self.world
            generator = torch.Generator().manual_seed(self.config.seed + 12345 + world.rank)
            total, count = 0.0, 0.0
            size = self.model.validation_batch_size(self.config.batch_size)
            for batch in source.batches(size, None, world.rank, world.size):
                loss = self.model.validation_loss(self._to_device(batch), generator)
                n = len(next(iter(batch.values())))
                total += float(loss) * n
                count += n
            total, count = distributed.all_reduce_sum([total, count])
        return total / max(count, 1)

    # --- checkpoints -----------------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, CHECKPOINT)

    def _save_checkpoint(self, state: LoopState,
                         optimisers: dict[str, torch.optim.Optimizer],
                         best_weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in self.model.module.state_dict().items()}
        tensors.update({f"best.{k}": v.detach().cpu().contiguous()
                        for k, v in best_weights.items()})
        groups: dict[str, Any] = {}
        scalars: dict[str, Any] = {}
        for player, optimiser in optimisers.items():
            optim_state = optimiser.state_dict()
            groups[player] = optim_state["param_groups"]
            for index, entry in optim_state["state"].items():
                for key, value in entry.items():
                    if torch.is_tensor(value):
                        tensors[f"optim.{player}.{index}.{key}"] = value.detach().cpu().contiguous()
                    else:
                        scalars[f"{player}.{index}.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        metadata = {"state": json.dumps(asdict(state)), "optim_groups": json.dumps(groups),
                    "optim_scalars": json.dumps(scalars)}
        with atomic_output(self._checkpoint_path()) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    def _load_checkpoint(self, optimisers: dict[str, torch.optim.Optimizer]
                         ) -> tuple[LoopState, dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self._checkpoint_path()
        # rank 0 reads the file, every process parses the same bytes (no shared file
        # system needed between nodes)
        distributed.from_main(_readable, path)  # a missing file: one error everywhere
        raw = distributed.broadcast_bytes(_read_bytes(path) if self.world.is_main else None)
        try:
            tensors = load(raw)
            metadata = _safetensors_metadata(raw)
            state = LoopState.from_dict(json.loads(metadata["state"]))
            groups = json.loads(metadata["optim_groups"])
            scalars = json.loads(metadata["optim_scalars"])
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise CaloforgeError(f"{path}: unreadable checkpoint ({exc!r})") from None
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        try:
            self.model.module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CaloforgeError(f"{path}: checkpoint does not match this model "
                                 f"({str(exc).splitlines()[0]})") from None
        if not isinstance(groups, dict) or set(groups) != set(optimisers):
            raise CaloforgeError(f"{path}: checkpoint optimisers do not match this model "
                                 "(written by another caloforge version or model family)")
        optim_states: dict[str, dict[int, dict[str, Any]]] = {p: {} for p in optimisers}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, player, index, name = key.split(".", 3)
                optim_states[player].setdefault(int(index), {})[name] = value
        for key, value in scalars.items():
            player, index, name = key.split(".", 2)
            optim_states[player].setdefault(int(index), {})[name] = value
        for player, optimiser in optimisers.items():
            optimiser.load_state_dict({"state": optim_states[player],
                                       "param_groups": groups[player]})
        torch.set_rng_state(tensors["rng.torch"])
        return state, best

    # --- the loop --------------------------------------------------------------------
    def fit(self, train: dict[str, torch.Tensor] | BatchSource,
            validation: dict[str, torch.Tensor] | BatchSource,
            resume: bool = False) -> dict[str, Any]:
        """Train; returns a summary (epochs, best validation loss and epoch, time, skips).

        ``train`` and ``validation``: batch dicts in memory or batch sources (streamed)."""
        config = self.config
        train = TensorBatches(train) if isinstance(train, dict) else train
        validation = TensorBatches(validation) if isinstance(validation, dict) else validation
        module = self.model.module.to(self.device)
        self.players = self.model.players()
        self.optimisers: dict[str, torch.optim.Optimizer] = {
            name: torch.optim.AdamW(parameters, lr=config.learning_rate * factor, betas=betas,
                                    weight_decay=config.weight_decay)
            for name, (parameters, factor, betas) in self.players.items()}
        world = self.world
        # every process starts from rank 0's weights; the showers of a step are the
        # per-process batch times the number of processes
        distributed.broadcast_module(module)
        n_train = int(distributed.all_reduce_sum([len(train)])[0])
        self.parts = config.parts_per_pass(n_train)
        self.total_steps = math.ceil(
            n_train / self.parts / (config.batch_size * world.size)) * config.epochs
        state = LoopState(config=asdict(config), world_size=world.size)
        self.best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if resume:
            state, self.best_weights = self._load_checkpoint(self.optimisers)
            if world.is_main:
                _truncate_log(self.log_path, state.epoch)
            log.info("resuming %s after epoch %d (best validation loss %.4f at epoch %d)",
                     self.run_dir, state.epoch, state.best_val or float("nan"), state.best_epoch)
            if state.world_size != world.size:
                log.info("the run had %d process(es), it goes on with %d: the data are "
                         "shared out anew", state.world_size, world.size)
                state.world_size = world.size
        else:
            distributed.from_main(_refuse_existing_run, self.run_dir, self._checkpoint_path())
            if world.is_main:
                _truncate_log(self.log_path, 0)
            if world.distributed:
                self._initialise_alike(train)
        if world.distributed:
            log.info("data-parallel training on %d processes: %d showers per process and "
                     "step, %d per step in all (learning rate %g, not scaled with the number "
                     "of processes)", world.size, config.batch_size,
                     config.batch_size * world.size, config.learning_rate)
        self.bar = self.progress(total=config.epochs, desc="train", unit="epoch",
                                 initial=state.epoch) if self.progress and world.is_main \
            else None
        epoch_seconds: float | None = None
        try:
            while state.epoch < config.epochs:
                # another epoch starts while at least a tenth of one fits in the budget; one
                # that does not fit ends when the budget is spent, so that the time-driven
                # learning-rate schedule anneals to its end
                if (config.time_budget_s is not None and epoch_seconds is not None
                        and state.elapsed_s + 0.1 * epoch_seconds > config.time_budget_s):
                    log.info("time budget reached after %d epochs", state.epoch)
                    break
                started = time.perf_counter()
                result = self.train_epoch(train, state, started)
                epoch_seconds = self.end_epoch(validation, state, result, started)
                if result.ended_by_time_budget:
                    log.info("time budget reached within epoch %d", state.epoch)
                    break
        finally:
            if self.bar is not None:
                self.bar.close()
        distributed.check_in_sync(module)
        module.load_state_dict(self.best_weights)
        if world.is_main:
            plot_loss_curve(self.log_path, os.path.join(self.run_dir, "loss_curve.png"),
                            self.model.validation_label)
        return {"epochs": state.epoch, "best_epoch": state.best_epoch,
                "best_val_loss": state.best_val, "train_seconds": round(state.elapsed_s, 1),
                "skipped_steps": state.skipped_steps, "restores": state.restores,
                "config": asdict(config)}

    def _initialise_alike(self, train: BatchSource) -> None:
        """Data-dependent initialisations (e.g. convflow's ActNorm layers, set by the first
        batch a layer sees in training) would differ between processes, which see
        different batches, and at different steps where a step trains a random subset of
        layers. So before training every process runs the validation loss (every part of
        the model) on its first batch in training mode, and then takes rank 0's weights."""
        module = self.model.module
        batch = next(iter(train.batches(self.config.batch_size, None)))
        module.train()
        with torch.enable_grad():
            self.model.validation_loss(self._to_device(batch),
                                       torch.Generator().manual_seed(self.config.seed))
        module.zero_grad(set_to_none=True)
        distributed.broadcast_module(module)

    def _epoch_generators(self, epoch: int) -> tuple[torch.Generator, torch.Generator]:
        """(order, noise) generators of ``epoch``: the order of a pass over the data comes
        from a generator seeded by the pass; with several epochs per pass, each epoch's
        noise from its own."""
        seed = self.config.seed
        if self.world.distributed:  # each process shuffles its own share, with its own noise
            seed = int(np.random.SeedSequence([seed, self.world.rank, self.world.size])
                       .generate_state(1)[0]) % 2 ** 31
        order = torch.Generator().manual_seed(seed * 100_003 + epoch // self.parts)
        if self.parts == 1:
            return order, order
        noise = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [seed, epoch, 1]).generate_state(1)[0]))
        return order, noise

    def train_epoch(self, train: BatchSource, state: LoopState, started: float) -> EpochResult:
        """The optimiser steps of epoch ``state.epoch + 1``; ends early when the time budget
        is spent (the budget holds within one step)."""
        config = self.config
        order, noise = self._epoch_generators(state.epoch)
        self.model.module.train()
        losses: dict[str, list[float]] = {name: [] for name in self.players}
        lr = learning_rate(config, state.step / self.total_steps)
        batches = train.batches(config.batch_size, order, state.epoch % self.parts, self.parts)
        while True:
            stop_if_terminated()
            batch = next(batches, None)
            spent = state.elapsed_s + time.perf_counter() - started
            has_batch = batch is not None
            if self.world.distributed:
                # every process takes a step, or none does (the epoch ends for all when one
                # runs out of batches), with the slowest process's clock for the budget
                # and the learning-rate schedule
                missing, spent = distributed.all_reduce_max([float(not has_batch), spent])
                has_batch = missing == 0
            if not has_batch or batch is None:
                break
            if config.time_budget_s is not None and any(losses.values()) \
                    and spent > config.time_budget_s:
                return EpochResult(losses, lr, ended_by_time_budget=True)
            progress = state.step / self.total_steps
            if config.time_budget_s:
                progress = max(progress, spent / config.time_budget_s)
            lr = learning_rate(config, progress)
            self.train_step(self._to_device(batch), noise, lr, state, losses)
        return EpochResult(losses, lr, ended_by_time_budget=False)

    def train_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                   lr: float, state: LoopState, losses: dict[str, list[float]]) -> None:
        """One optimiser step of each scheduled player on ``batch``; a step whose loss or
        gradient is not finite is skipped (too many in a row stop the run)."""
        for name in self.model.player_schedule(state.step):
            parameters, factor, _ = self.players[name]
            optimiser = self.optimisers[name]
            for group in optimiser.param_groups:
                group["lr"] = lr * factor
            optimiser.zero_grad(set_to_none=True)
            loss = _accumulate_gradients(partial(self.model.player_loss, name,
                                                 generator=generator),
                                         batch, self.config.micro_batch_size)
            loss = distributed.average_gradients(
                [p for p in parameters if p.requires_grad], loss)
            if torch.isfinite(loss):
                norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
                if torch.isfinite(norm):
                    optimiser.step()
                    losses[name].append(float(loss.detach()))
                    self.consecutive_bad_steps = 0
                    continue
            self.consecutive_bad_steps += 1
            state.skipped_steps += 1
            if self.consecutive_bad_steps >= self.config.max_nonfinite_in_a_row:
                raise CaloforgeError(
                    f"{self.run_dir}: training diverged ({self.consecutive_bad_steps} "
                    f"non-finite steps in a row at epoch {state.epoch + 1}); try a lower "
                    "learning rate")
        state.step += 1

    def end_epoch(self, validation: BatchSource, state: LoopState, result: EpochResult,
                  started: float) -> float:
        """Validate, select, log, checkpoint, call the model's hooks; returns the epoch's
        seconds."""
        module = self.model.module
        world = self.world
        distributed.broadcast_module(module, buffers_only=True)
        val_loss = self.evaluate(validation)
        if not math.isfinite(val_loss):
            module.load_state_dict(self.best_weights)
            state.restores += 1
            log.warning("epoch %d: non-finite validation loss; best weights restored",
                        state.epoch + 1)
        improved = math.isfinite(val_loss) and (state.best_val is None
                                                or val_loss < state.best_val)
        # the slowest process's time, so that every process takes the same time-budget
        # decisions
        epoch_seconds = distributed.all_reduce_max([time.perf_counter() - started])[0]
        state.elapsed_s += epoch_seconds
        state.epoch += 1
        means = {name: float(np.mean(v)) if v else float("nan")
                 for name, v in result.player_losses.items()}
        record: dict[str, Any] = {
            "epoch": state.epoch, "train_loss": next(iter(means.values())),
            "val_loss": val_loss, "lr": result.learning_rate,
            "seconds": round(epoch_seconds, 2), "skipped_steps": state.skipped_steps,
            "best": improved}
        if result.ended_by_time_budget:
            record["ended_by_time_budget"] = True
        if len(means) > 1:
            record["player_losses"] = means
        if improved:
            state.best_val, state.best_epoch = val_loss, state.epoch
            self.best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            if world.is_main:
                self.model.on_best(self.run_dir, state)
        if world.is_main:  # only rank 0 writes
            # the log line before the checkpoint: a kill between the two leaves one record
            # too many, which resuming truncates, rather than an epoch missing from the log
            with open(self.log_path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
            self._save_checkpoint(state, self.optimisers, self.best_weights)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{val_loss:.3f}")
            self.model.on_epoch_end(self.run_dir, record)
        return epoch_seconds


def fit_model(model: Any, data: ShowerData | ShowerStream, run_dir: str, resume: bool = False,
              device: str = "cpu", progress: Callable[..., Any] | None = None,
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``model.fit`` does, for every family, top to bottom: split the data
    (showers, or the blocks of a stream) into training and validation, let the model fit
    its preprocessing and build its module (``prepare_fit``), run the :class:`Trainer`,
    then ``end_fit`` and save the model (best weights) into ``run_dir``.

    ``model``: a :class:`~caloforge.models.base.ConditionedModel` (its ``config.training``,
    ``geometry``, ``to_tensors``, ``save`` and the :class:`TrainingHooks`). ``metadata``
    (e.g. the training file) is recorded in the training summary."""
    model.geometry.check_voxels(data.n_voxels)
    training: TrainingConfig = model.config.training
    training.validate()
    world = distributed.current_world()
    if isinstance(data, ShowerStream) and not model.streams_training_data:
        data = data.read_all()
    if isinstance(data, ShowerStream):
        train_blocks, val_blocks = split_indices(data.n_blocks, training.val_fraction,
                                                 training.seed)
        n_train, n_val = data.count(train_blocks), data.count(val_blocks)
        if len(train_blocks) < 1 or n_train < 2:
            raise CaloforgeError(f"{data.path}: too few showers or blocks to train "
                                 f"({len(data)} showers in {data.n_blocks} blocks)")
        sample = _preprocessing_sample(data, train_blocks, model.preprocessing_sample_values,
                                       training.seed)
        model.prepare_fit(sample, resume, device)
        if not resume:  # training range: every training shower, not the subsample
            energies, conditions = data.read_conditions(train_blocks)
            model.fit_condition_range(energies, conditions, data.condition_units)
        if len(train_blocks) < world.size:
            raise CaloforgeError(f"{data.path}: {len(train_blocks)} training blocks for "
                                 f"{world.size} processes; use fewer processes or smaller "
                                 "blocks")
        train_blocks = rank_share(train_blocks, world, training.seed)
        train_source: BatchSource = StreamedBatches(data, train_blocks, model.to_tensors)
        val_source: BatchSource = StreamedBatches(data, val_blocks, model.to_tensors)
    else:
        train_index, val_index = split_indices(len(data), training.val_fraction, training.seed)
        n_train, n_val = len(train_index), len(val_index)
        if n_train < 2:
            raise CaloforgeError(f"too few showers to train: {len(data)}")
        model.prepare_fit(data.select(train_index), resume, device)
        train_source = TensorBatches(model.to_tensors(
            data, rank_share(train_index, world, training.seed)))
        val_source = TensorBatches(model.to_tensors(data, val_index))
    _check_same_preprocessing(model)
    summary = Trainer(model, training, run_dir, device, progress).fit(
        train_source, val_source, resume=resume)
    model.training_summary = {**summary, "n_train": n_train, "n_validation": n_val,
                              **(metadata or {})}
    if world.distributed:
        model.training_summary["processes"] = world.size
    if world.is_main:
        model.end_fit(data, run_dir)
        model.module.cpu()
        model.save(run_dir)
    distributed.barrier()  # the model is on disk before any process reports success
    return model.training_summary


def rank_share(index: np.ndarray, world: distributed.World, seed: int) -> np.ndarray:
    """This process's fixed share of the training ``index`` (shower or block numbers),
    sorted: the index shuffled by ``seed`` and cut into ``world.size`` near-equal parts,
    disjoint and together the whole set (one process: all of it, unshuffled)."""
    if not world.distributed:
        return index
    order = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(index)
    return np.sort(distributed.rank_part(order, world))


def _check_same_preprocessing(model: Any) -> None:
    """Every process fitted its preprocessing from the same data (deterministic): refuse
    to go on if any differs from rank 0's, so that every process transforms alike."""
    if not distributed.current_world().distributed:
        return
    import hashlib

    digest = hashlib.sha256(json.dumps(model.to_json_state(), sort_keys=True,
                                       default=str).encode()).hexdigest()
    differs = digest != distributed.broadcast_object(digest)
    if distributed.any_rank(differs):
        raise CaloforgeError("the processes fitted different preprocessing from the same "
                             "training data; train with one process")


def _refuse_existing_run(run_dir: str, checkpoint: str) -> None:
    if os.path.exists(checkpoint):
        raise CaloforgeError(f"{run_dir}: already holds a training run; use --resume "
                             "to continue it or choose another output directory")


def _readable(path: str) -> bool:
    """True, or a CaloforgeError naming why ``path`` cannot be read."""
    if not os.path.exists(path):
        raise CaloforgeError(f"{path}: no checkpoint to resume from")
    if not os.access(path, os.R_OK):
        raise CaloforgeError(f"{path}: checkpoint not readable")
    return True


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (an 8-byte little-endian header
    length, then the JSON header)."""
    if len(raw) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError("no metadata in the safetensors header")
    return metadata


def _preprocessing_sample(stream: ShowerStream, blocks: np.ndarray, max_values: int,
                          seed: int) -> ShowerData:
    """Random blocks of ``blocks``, at most ``max_values`` voxel values in all."""
    per_block = stream.block_size * stream.n_voxels
    count = max(1, min(len(blocks), max_values // per_block))
    rng = np.random.default_rng(seed)
    return stream.read_blocks(np.sort(rng.choice(blocks, count, replace=False)))


def _truncate_log(path: str, epochs: int) -> None:
    """Keep the first ``epochs`` records of the log (a resumed run rewrites the rest)."""
    if not os.path.exists(path):
        return
    records = [json.dumps(record) + "\n" for record in read_log(path)][:epochs]
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.writelines(records)


def read_log(path: str) -> list[dict[str, Any]]:
    """The epoch records of a ``train_log.jsonl``; a torn last line (a run killed while
    appending it) is skipped with a warning, and dropped by the next resume."""
    with open(path, encoding="utf-8") as stream:
        lines = [line for line in stream if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise CaloforgeError(f"{path}: line {number} is not a JSON record") from None
            log.warning("%s: ignoring a torn last line (a run killed while writing it)", path)
    return records


def plot_loss_curve(log_path: str, png_path: str, validation_label: str | None = None) -> None:
    """Training and validation loss per epoch, best epoch marked.

    With several players (a GAN) each player's loss is drawn and the validation figure, on
    its own axis, is labelled ``validation_label``."""
    if not os.path.exists(log_path):
        return
    records = read_log(log_path)
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    players = records[-1].get("player_losses")
    if players:
        for name in players:
            ax.plot(epochs, [r.get("player_losses", {}).get(name, float("nan")) for r in records],
                    label=f"{name} loss")
        ax.set_ylabel("training loss")
        ax.set_yscale("symlog")  # adversarial losses change sign and span decades
        val_ax = ax.twinx()
        val_ax.plot(epochs, [r["val_loss"] for r in records], color="black", label="validation")
        val_ax.set_ylabel(validation_label or "validation")
        handles = ax.get_legend_handles_labels()[0] + val_ax.get_legend_handles_labels()[0]
    else:
        ax.plot(epochs, [r["train_loss"] for r in records], label="train")
        ax.plot(epochs, [r["val_loss"] for r in records], label="validation")
        later = [v for r in records[1:] for v in (r["train_loss"], r["val_loss"])
                 if math.isfinite(v)]
        if len(records) >= 3 and later:  # the first epoch's loss would squash the rest
            low, high = min(later), max(later)
            ax.set_ylim(low - 0.1 * (high - low), high + 0.3 * (high - low))
        ax.set_ylabel(validation_label or "loss (negative log-likelihood per shower)")
    best = [r for r in records if r.get("best")]
    if best:
        ax.axvline(best[-1]["epoch"], color="grey", ls=":",
                   label=f"best (epoch {best[-1]['epoch']})")
    ax.set_xlabel("epoch")
    if players:
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0][len(players):], fontsize=8)
    else:
        ax.legend()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
