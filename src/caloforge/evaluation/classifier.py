"""The real-vs-generated classifier test (CaloChallenge definition).

An MLP with LeakyReLU learns to tell reference from generated showers. Each class is split
into train / test / validation; the epoch with the best test accuracy is kept; its test
outputs fit an isotonic calibration; the calibrated validation outputs give the AUC and
JSD = (ln 2 - BCE) / ln 2. 0.5 / 0 mean indistinguishable, 1 / 1 perfectly separable.

Two presets:

* ``official``: exactly the CaloChallenge ``evaluate.py`` classifier (commit 9b41df7 of
  2025-08-07, definitions in ``docs/evaluation.md``): Linear(d, 2048) -> LeakyReLU ->
  [Linear(2048, 2048) -> LeakyReLU] x 2 -> Linear(2048, 1), float64, Adam 2e-4, batch 1000,
  50 epochs, stopping early only at test accuracy 1.0; per class fixed split sizes for the
  CaloChallenge datasets (dataset 1 photons 80000/20000/21000, pions 80000/20000/20800,
  datasets 2 and 3 60000/20000/20000), both classes the same size. Other geometries have no
  official sizes: both classes are cut to the smaller one and split 60/20/20, as the
  official ``ttv_split`` does with what it is given.
* ``fast``: CPU-sized (256 wide, two hidden layers, float32, standardised inputs, batch 256,
  early stopping after 8 epochs without a better test accuracy), 60/20/20 of each class.

``width`` and ``epochs`` overrides keep every other rule of a preset and are recorded.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..errors import CaloforgeError, OptionError


class Rows(Protocol):
    """What the classifier reads a sample from: an ``(N, d)`` array, or an object that
    builds the rows asked for (``rows[index]`` ``(len(index), d)``; e.g.
    :class:`~caloforge.evaluation.features.LowLevelInputs`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __len__(self) -> int: ...

    def __getitem__(self, rows: Any) -> Any: ...


@dataclass(frozen=True)
class ClassifierPreset:
    """Classifier settings.

    ``hidden_layers``: number of hidden layers (the official one has 3: input -> hidden and
    two hidden -> hidden); ``patience``: stop after that many epochs without a better test
    accuracy (None: only at test accuracy 1.0, the official rule); ``split``: ``"official"``
    (fixed per-class sizes, equal classes) or ``"fractions"`` (60/20/20 of each class).
    """

    name: str
    hidden: int
    learning_rate: float
    batch_size: int
    max_epochs: int
    patience: int | None
    hidden_layers: int = 3
    dtype: str = "float64"
    split: str = "official"
    dropout: float = 0.0
    standardise: bool = False  # scale inputs by the training split's mean and std


PRESETS = {
    "official": ClassifierPreset("official", hidden=2048, learning_rate=2e-4, batch_size=1000,
                                 max_epochs=50, patience=None),
    # CPU-sized: narrower, standardised inputs, smaller batches (enough optimiser steps on
    # small samples), early stopping on the test accuracy
    "fast": ClassifierPreset("fast", hidden=256, learning_rate=2e-3, batch_size=256,
                             max_epochs=60, patience=8, hidden_layers=2, dtype="float32",
                             split="fractions", standardise=True),
}
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
# evaluate.py's per-class (train, test, validation) sizes
OFFICIAL_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "1-photons": (80_000, 20_000, 21_000),
    "1-pions": (80_000, 20_000, 20_800),
    "2": (60_000, 20_000, 20_000),
    "3": (60_000, 20_000, 20_000),
}
MIN_SHOWERS_PER_CLASS = 50


def get_preset(name: str, width: int | None = None, epochs: int | None = None
               ) -> ClassifierPreset:
    """The preset ``name`` with optional width / epoch overrides (every other rule kept)."""
    if name not in PRESETS:
        raise OptionError(f"unknown classifier preset {name!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if width is not None:
        if width < 1:
            raise OptionError(f"--classifier-width must be >= 1, got {width}")
        preset = replace(preset, hidden=width)
    if epochs is not None:
        if epochs < 1:
            raise OptionError(f"--classifier-epochs must be >= 1, got {epochs}")
        preset = replace(preset, max_epochs=epochs)
    return preset


def build_classifier(n_inputs: int, preset: ClassifierPreset) -> Any:
    """The preset's MLP for ``n_inputs`` features, in its dtype, ending in one logit."""
    import torch

    layers: list[Any] = []
    width_in = n_inputs
    for _ in range(preset.hidden_layers):
        layers += [torch.nn.Linear(width_in, preset.hidden), torch.nn.LeakyReLU(),
                   torch.nn.Dropout(preset.dropout)]
        width_in = preset.hidden
    layers.append(torch.nn.Linear(width_in, 1))
    return torch.nn.Sequential(*layers).to(getattr(torch, preset.dtype))


def split_sizes(n_reference: int, n_generated: int, preset: ClassifierPreset,
                dataset: str | None, labels: tuple[str, str] = ("reference", "generated")
                ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(train, test, validation) sizes of each class; refuses samples too small for them.

    ``dataset``: the CaloChallenge tag of the geometry (``calochallenge_dataset``) or None.
    """
    counts = (n_reference, n_generated)
    for label, n in zip(labels, counts):
        if n < MIN_SHOWERS_PER_CLASS:
            raise CaloforgeError(f"the classifier needs at least {MIN_SHOWERS_PER_CLASS} "
                                 f"showers per sample for its train/test/validation split; "
                                 f"{label} has {n}")
    if preset.split == "official" and dataset in OFFICIAL_SPLIT_SIZES:
        sizes = OFFICIAL_SPLIT_SIZES[dataset]
        for label, n in zip(labels, counts):
            if n < sum(sizes):
                raise CaloforgeError(
                    f"the official classifier split of dataset {dataset} needs "
                    f"{sum(sizes)} showers per sample ({'/'.join(map(str, sizes))}); {label} "
                    f"has {n} (use --classifier-preset fast, or more showers)")
        return sizes, sizes
    if preset.split == "official":  # no official sizes: equal classes, 60/20/20
        counts = (min(counts),) * 2
    return tuple(_fraction_sizes(n) for n in counts)  # type: ignore[return-value]


def _fraction_sizes(n: int) -> tuple[int, int, int]:
    n_train, n_test = int(SPLIT_FRACTIONS[0] * n), int(SPLIT_FRACTIONS[1] * n)
    return n_train, n_test, n - n_train - n_test


def estimate_training_seconds(n_inputs: int, n_train: int, preset: ClassifierPreset,
                              device: str = "cpu") -> float:
    """Upper estimate of the training time (all epochs): a few timed optimiser steps."""
    import torch

    with torch.random.fork_rng(devices=[]):
        model = build_classifier(n_inputs, preset).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=preset.learning_rate)
        x = torch.zeros(preset.batch_size, n_inputs, dtype=getattr(torch, preset.dtype),
                        device=device)
        y = torch.zeros(preset.batch_size, dtype=x.dtype, device=device)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x).squeeze(1), y).backward()
            optimiser.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
    steps = math.ceil(n_train / preset.batch_size)
    # + the test-set pass each epoch (forward only, a third of a training step per shower)
    return min(timings[1:]) * steps * preset.max_epochs * (1 + 0.25 / 3)


def classifier_test(reference: Rows, generated: Rows, preset: ClassifierPreset,
                    seed: int = 0, device: str = "cpu", dataset: str | None = None,
                    progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train the classifier on ``reference`` ``(N1, d)`` vs ``generated`` ``(N2, d)`` inputs
    (arrays, or :class:`Rows` that build the rows asked for).

    Returns a dict with ``auc``, ``jsd``, ``best_epoch``, ``epochs_run`` and the split sizes.
    """
    import torch
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    sizes = split_sizes(len(reference), len(generated), preset, dataset)
    rng = np.random.default_rng(seed)
    parts = [_split(len(reference), sizes[0], rng), _split(len(generated), sizes[1], rng)]
    dtype = np.dtype(preset.dtype)
    # The training rows are gathered batch by batch, not copied out whole: with 20,000
    # showers of 27,000-40,500 voxels a side, a copy of the training split (and another
    # for its standardised values) is 5-8 GB.
    train_rows = _Rows(reference, generated, parts[0][0], parts[1][0])
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None
    if preset.standardise:
        mean, std = train_rows.moments()
        std[std == 0] = 1.0
        shift, scale = mean.astype(dtype), std.astype(dtype)

    def scaled(x: np.ndarray) -> np.ndarray:
        """``x`` in the preset's dtype, standardised in place where the preset is."""
        x = x.astype(dtype, copy=False)
        if shift is not None and scale is not None:
            x -= shift
            x /= scale
        return x

    def gather(which: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([reference[parts[0][which]], generated[parts[1][which]]])
        y = np.concatenate([np.zeros(len(parts[0][which])), np.ones(len(parts[1][which]))])
        return scaled(x), y.astype(dtype)

    (x_test, y_test), (x_val, y_val) = gather(1), gather(2)
    y_train = train_rows.labels().astype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(reference.shape[1], preset).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=preset.learning_rate)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        yt = torch.from_numpy(y_train).to(device)
        generator = torch.Generator().manual_seed(seed)
        best_accuracy, best_state, best_epoch, stale = -1.0, None, 0, 0
        epochs = range(preset.max_epochs)
        if progress is not None:
            epochs = progress(epochs, total=preset.max_epochs, desc="classifier", unit="epoch")
        epochs_run = 0
        for epoch in epochs:
            model.train()
            order = torch.randperm(len(yt), generator=generator)
            for start in range(0, len(order), preset.batch_size):
                index = order[start:start + preset.batch_size]
                x = torch.from_numpy(scaled(train_rows.take(index.numpy()))).to(device)
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(model(x).squeeze(1), yt[index.to(device)])
                loss.backward()
                optimiser.step()
            epochs_run = epoch + 1
            accuracy = float(((_predict(model, x_test, device) > 0.5) == y_test).mean())
            if accuracy > best_accuracy:
                best_accuracy, best_epoch, stale = accuracy, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if accuracy == 1.0 or (preset.patience is not None and stale >= preset.patience):
                break
        assert best_state is not None
        model.load_state_dict(best_state)
        p_test = _predict(model, x_test, device)
        p_val = _predict(model, x_val, device)
    calibrator = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6)
    calibrator.fit(p_test, y_test)
    p_cal = np.clip(calibrator.predict(p_val), 1e-6, 1 - 1e-6)
    auc = float(roc_auc_score(y_val, p_cal))
    bce = float(-np.mean(y_val * np.log(p_cal) + (1 - y_val) * np.log(1 - p_cal)))
    jsd = (math.log(2) - bce) / math.log(2)
    return {"auc": auc, "jsd": jsd, "best_epoch": best_epoch, "epochs_run": epochs_run,
            "test_accuracy": best_accuracy, "n_train": len(y_train), "n_test": len(x_test),
            "n_val": len(x_val), "seed": seed}


class _Rows:
    """The rows ``reference_rows`` of ``reference`` followed by the rows ``generated_rows``
    of ``generated`` (each ``(N, d)``), read on demand instead of copied out."""

    def __init__(self, reference: Rows, generated: Rows,
                 reference_rows: np.ndarray, generated_rows: np.ndarray) -> None:
        self.arrays = (reference, generated)
        self.rows = (reference_rows, generated_rows)

    def __len__(self) -> int:
        return len(self.rows[0]) + len(self.rows[1])

    def labels(self) -> np.ndarray:
        """``(len,)``: 0 for a reference row, 1 for a generated one."""
        return np.concatenate([np.zeros(len(self.rows[0])), np.ones(len(self.rows[1]))])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` ``(B,)`` (in this order) ``(B, d)``, a copy."""
        first = len(self.rows[0])
        out = np.empty((len(positions), self.arrays[0].shape[1]), dtype=self.arrays[0].dtype)
        from_reference = positions < first
        out[from_reference] = self.arrays[0][self.rows[0][positions[from_reference]]]
        out[~from_reference] = self.arrays[1][self.rows[1][positions[~from_reference] - first]]
        return out

    def moments(self, chunk: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation ``(d,)`` (float64) of every column over the rows,
        read ``chunk`` rows at a time."""
        total = np.zeros(self.arrays[0].shape[1])
        squares = np.zeros_like(total)
        for array, rows in zip(self.arrays, self.rows):
            for start in range(0, len(rows), chunk):
                block = array[np.sort(rows[start:start + chunk])].astype(np.float64)
                total += block.sum(axis=0)
                squares += np.square(block).sum(axis=0)
        n = max(len(self), 1)
        mean = total / n
        return mean, np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))


def _split(n: int, sizes: tuple[int, int, int], rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint random index sets of the given sizes out of ``range(n)``."""
    order = rng.permutation(n)
    n_train, n_test, n_val = sizes
    return (order[:n_train], order[n_train:n_train + n_test],
            order[n_train + n_test:n_train + n_test + n_val])


def _predict(model: Any, x: np.ndarray, device: str, batch: int = 10_000) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[start:start + batch]).to(device)).squeeze(1)
            out.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def repeated_classifier_test(reference: Rows, generated: Rows,
                             preset: ClassifierPreset, repeats: int = 3, seed: int = 0,
                             device: str = "cpu", dataset: str | None = None,
                             progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``classifier_test`` over ``repeats`` seeds: mean and std of AUC and JSD, and each run."""
    if repeats < 1:
        raise OptionError(f"--repeats must be >= 1, got {repeats}")
    runs = [classifier_test(reference, generated, preset, seed + k, device, dataset, progress)
            for k in range(repeats)]
    aucs = np.array([r["auc"] for r in runs])
    jsds = np.array([r["jsd"] for r in runs])
    first = runs[0]
    return {"auc_mean": float(aucs.mean()), "auc_std": float(aucs.std()),
            "jsd_mean": float(jsds.mean()), "jsd_std": float(jsds.std()),
            "preset": asdict(preset), "repeats": repeats, "n_inputs": int(reference.shape[1]),
            "split_per_class": {"train": first["n_train"] // 2, "test": first["n_test"] // 2,
                                "validation": first["n_val"] // 2}
            if preset.split == "official" else "60/20/20 of each sample",
            "runs": runs}
