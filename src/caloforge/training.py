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
  step, the memory of one micro-batch).

No global state: every random number comes from generators seeded by (seed, epoch).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from .atomic import atomic_output
from .data import ShowerData, ShowerStream
from .errors import CaloforgeError, OptionError
from .runtime import get_logger, parse_quantity

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
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        check_known_options(cls, values, "training")
        return cls(**values)


def check_known_options(config_class: Any, values: dict[str, Any], what: str) -> None:
    """Raise an OptionError naming any key of ``values`` that is not a field of the
    dataclass ``config_class``."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")


class Trainable(Protocol):
    module: torch.nn.Module

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        ...


# A player: the parameters one optimiser updates, its learning-rate factor (times the
# scheduled rate) and its Adam betas.
Player = tuple[list[torch.nn.Parameter], float, tuple[float, float]]
DEFAULT_BETAS = (0.9, 0.999)


def model_players(model: Any) -> dict[str, Player]:
    """The model's players; a plain model is one player, ``"model"``, with all parameters."""
    if hasattr(model, "players"):
        return model.players()
    return {"model": (list(model.module.parameters()), 1.0, DEFAULT_BETAS)}


def learning_rate(config: "TrainingConfig", progress: float) -> float:
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
        order = _part(torch.randperm(len(self), generator=generator), part, parts)
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
            parts = [self.to_tensors(self.stream.read_block(int(b)))
                     for b in order[first:first + self.buffer_blocks]]
            buffer = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
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


class Trainer:
    """Runs the loop for one model in one run directory (see the module docstring)."""

    def __init__(self, model: Trainable, config: TrainingConfig, run_dir: str,
                 device: str = "cpu", progress: Callable[..., Any] | None = None,
                 on_best: Callable[[dict[str, Any]], None] | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> None:
        config.validate()
        self.model, self.config, self.run_dir = model, config, run_dir
        self.device = device
        self.progress = progress
        self.on_best = on_best
        self.on_epoch = on_epoch
        os.makedirs(run_dir, exist_ok=True)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def evaluate(self, source: BatchSource) -> float:
        """Mean loss over ``source`` with fixed noise (seeded), no gradients; or the
        model's ``validation_metric`` of the whole set where it has one."""
        module = self.model.module
        module.eval()
        if hasattr(self.model, "validation_metric"):
            if not isinstance(source, TensorBatches):
                raise CaloforgeError("this model family validates in memory: train it "
                                     "without streaming")
            with torch.no_grad():
                return float(self.model.validation_metric(source.tensors, self.device))
        # a model may select epochs by another figure than its training loss
        # (e.g. a distilled student by its KL divergence from the teacher)
        loss_function = getattr(self.model, "validation_loss", self.model.loss)
        generator = torch.Generator().manual_seed(self.config.seed + 12345)
        total, count = 0.0, 0
        with torch.no_grad():
            size = getattr(self.model, "validation_batch_size", None) or max(
                self.config.batch_size, 1024)
            for batch in source.batches(size, None):
                loss = loss_function(self._to_device(batch), generator)
                n = len(next(iter(batch.values())))
                total += float(loss) * n
                count += n
        return total / max(count, 1)

    # --- checkpoints -----------------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, CHECKPOINT)

    def _save_checkpoint(self, state: dict[str, Any],
                         optimisers: dict[str, torch.optim.Optimizer],
                         best_weights: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in self.model.module.state_dict().items()}
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_weights.items()})
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
        metadata = {"state": json.dumps(state), "optim_groups": json.dumps(groups),
                    "optim_scalars": json.dumps(scalars)}
        with atomic_output(self._checkpoint_path()) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    def _load_checkpoint(self, optimisers: dict[str, torch.optim.Optimizer]
                         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        path = self._checkpoint_path()
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except FileNotFoundError:
            raise CaloforgeError(f"{path}: no checkpoint to resume from") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CaloforgeError(f"{path}: unreadable checkpoint ({exc})") from None
        state = json.loads(metadata["state"])
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        try:
            self.model.module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CaloforgeError(f"{path}: checkpoint does not match this model "
                                 f"({str(exc).splitlines()[0]})") from None
        groups = json.loads(metadata["optim_groups"])
        scalars = json.loads(metadata["optim_scalars"])
        if isinstance(groups, list) and list(optimisers) == ["model"]:
            # written before models could have several players: one optimiser, no names
            groups = {"model": groups}
            scalars = {f"model.{key}": value for key, value in scalars.items()}
            tensors = {f"optim.model.{k[6:]}" if k.startswith("optim.") else k: v
                       for k, v in tensors.items()}
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
        if isinstance(train, dict):
            train = TensorBatches(train)
        if isinstance(validation, dict):
            validation = TensorBatches(validation)
        module = self.model.module.to(self.device)
        players = model_players(self.model)
        optimisers = {name: torch.optim.AdamW(parameters, lr=config.learning_rate * factor,
                                              betas=betas, weight_decay=config.weight_decay)
                      for name, (parameters, factor, betas) in players.items()}
        schedule = getattr(self.model, "player_schedule", lambda step: tuple(players))
        player_loss = getattr(self.model, "player_loss",
                              lambda name, batch, generator: self.model.loss(batch, generator))
        n_train = len(train)
        parts = config.parts_per_pass(n_train)
        steps_per_epoch = math.ceil(n_train / parts / config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        state: dict[str, Any] = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "best_val": None,
                                 "best_epoch": 0, "skipped_steps": 0, "restores": 0,
                                 "config": asdict(config)}
        best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
        log_path = os.path.join(self.run_dir, TRAIN_LOG)
        if resume:
            state, best_weights = self._load_checkpoint(optimisers)
            _truncate_log(log_path, state["epoch"])
            log.info("resuming %s after epoch %d (best validation loss %.4f at epoch %d)",
                     self.run_dir, state["epoch"], state["best_val"] or float("nan"),
                     state["best_epoch"])
        elif os.path.exists(self._checkpoint_path()):
            raise CaloforgeError(f"{self.run_dir}: already holds a training run; use --resume "
                                 "to continue it or choose another output directory")
        else:
            _truncate_log(log_path, 0)
        epoch_seconds = None
        consecutive_bad = 0
        bar = self.progress(total=config.epochs, desc="train", unit="epoch",
                            initial=state["epoch"]) if self.progress else None
        try:
            while state["epoch"] < config.epochs:
                # another epoch starts while at least a tenth of one fits in the budget; one
                # that does not fit ends when the budget is spent, so that the time-driven
                # learning-rate schedule anneals to its end
                if (config.time_budget_s is not None and epoch_seconds is not None
                        and state["elapsed_s"] + 0.1 * epoch_seconds > config.time_budget_s):
                    log.info("time budget reached after %d epochs", state["epoch"])
                    break
                started = time.perf_counter()
                epoch = state["epoch"]
                pass_index, part = divmod(epoch, parts)
                # the order of a pass comes from a generator seeded by the pass; with several
                # epochs per pass, each epoch's noise from its own
                generator = torch.Generator().manual_seed(config.seed * 100_003 + pass_index)
                order = generator
                if parts > 1:
                    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(
                        [config.seed, epoch, 1]).generate_state(1)[0]))
                module.train()
                losses: dict[str, list[float]] = {name: [] for name in players}
                budget_spent = False
                for batch in train.batches(config.batch_size, order, part, parts):
                    # an epoch longer than what is left of the budget ends early (then
                    # validation and checkpoint as usual): the budget holds within one step
                    if (config.time_budget_s is not None and any(losses.values())
                            and state["elapsed_s"] + time.perf_counter() - started
                            > config.time_budget_s):
                        budget_spent = True
                        break
                    progress = state["step"] / total_steps
                    if config.time_budget_s:
                        progress = max(progress, (state["elapsed_s"] + time.perf_counter()
                                                  - started) / config.time_budget_s)
                    lr = learning_rate(config, progress)
                    batch = self._to_device(batch)
                    for name in schedule(state["step"]):
                        parameters, factor, _ = players[name]
                        optimiser = optimisers[name]
                        for group in optimiser.param_groups:
                            group["lr"] = lr * factor
                        optimiser.zero_grad(set_to_none=True)
                        loss = _accumulate_gradients(
                            lambda part: player_loss(name, part, generator), batch,
                            config.micro_batch_size)
                        if torch.isfinite(loss):
                            norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                            if torch.isfinite(norm):
                                optimiser.step()
                                losses[name].append(float(loss.detach()))
                                consecutive_bad = 0
                                continue
                        consecutive_bad += 1
                        state["skipped_steps"] += 1
                        if consecutive_bad >= config.max_nonfinite_in_a_row:
                            raise CaloforgeError(
                                f"{self.run_dir}: training diverged ({consecutive_bad} non-finite "
                                f"steps in a row at epoch {epoch + 1}); try a lower learning rate")
                    state["step"] += 1
                val_loss = self.evaluate(validation)
                if not math.isfinite(val_loss):
                    module.load_state_dict(best_weights)
                    state["restores"] += 1
                    log.warning("epoch %d: non-finite validation loss; best weights restored",
                                epoch + 1)
                improved = math.isfinite(val_loss) and (state["best_val"] is None
                                                        or val_loss < state["best_val"])
                epoch_seconds = time.perf_counter() - started
                state["elapsed_s"] += epoch_seconds
                state["epoch"] = epoch + 1
                means = {name: float(np.mean(v)) if v else float("nan")
                         for name, v in losses.items()}
                record = {"epoch": epoch + 1, "train_loss": next(iter(means.values())),
                          "val_loss": val_loss, "lr": lr,
                          "seconds": round(epoch_seconds, 2),
                          "skipped_steps": state["skipped_steps"], "best": improved}
                if budget_spent:
                    record["ended_by_time_budget"] = True
                if len(means) > 1:
                    record["player_losses"] = means
                if improved:
                    state["best_val"], state["best_epoch"] = val_loss, epoch + 1
                    best_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
                    if self.on_best is not None:
                        self.on_best(dict(state))
                self._save_checkpoint(state, optimisers, best_weights)
                with open(log_path, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(train=f"{record['train_loss']:.3f}", val=f"{val_loss:.3f}")
                if self.on_epoch is not None:
                    self.on_epoch(record)
                if budget_spent:
                    log.info("time budget reached within epoch %d", epoch + 1)
                    break
        finally:
            if bar is not None:
                bar.close()
        module.load_state_dict(best_weights)
        plot_loss_curve(log_path, os.path.join(self.run_dir, "loss_curve.png"),
                        getattr(self.model, "validation_label", None))
        return {"epochs": state["epoch"], "best_epoch": state["best_epoch"],
                "best_val_loss": state["best_val"], "train_seconds": round(state["elapsed_s"], 1),
                "skipped_steps": state["skipped_steps"], "restores": state["restores"],
                "config": asdict(config)}


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
        ax.axvline(best[-1]["epoch"], color="grey", ls=":", label=f"best (epoch {best[-1]['epoch']})")
    ax.set_xlabel("epoch")
    if players:
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0][len(players):], fontsize=8)
    else:
        ax.legend()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
