"""The real-vs-generated classifier test (CaloChallenge definition).

An MLP (input -> 2 hidden layers -> 1 logit, LeakyReLU) learns to tell reference from
generated showers. Each class is split into train / test / validation (60/20/20); the epoch
with the best test accuracy is kept; its test outputs fit an isotonic calibration; the
calibrated validation outputs give the AUC and JSD = (ln 2 - BCE) / ln 2.
0.5 / 0 mean indistinguishable, 1 / 1 perfectly separable.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import CaloforgeError, OptionError


@dataclass(frozen=True)
class ClassifierPreset:
    """Classifier settings. ``patience``: stop after that many epochs without a better
    test accuracy (None: run all epochs, as the official code)."""

    name: str
    hidden: int
    learning_rate: float
    batch_size: int
    max_epochs: int
    patience: int | None
    dropout: float = 0.0
    standardise: bool = False  # scale inputs by the training split's mean and std


PRESETS = {
    # CaloChallenge evaluate.py settings (as in ../shared/notes/anchors.md)
    "official": ClassifierPreset("official", hidden=2048, learning_rate=2e-4, batch_size=1000,
                                 max_epochs=50, patience=None),
    # CPU-sized: narrower, standardised inputs, smaller batches (enough optimiser steps on
    # small samples), early stopping on the test accuracy
    "fast": ClassifierPreset("fast", hidden=256, learning_rate=2e-3, batch_size=256,
                             max_epochs=60, patience=8, standardise=True),
}
SPLIT = (0.6, 0.2, 0.2)
MIN_SHOWERS_PER_CLASS = 50


def get_preset(name: str) -> ClassifierPreset:
    if name not in PRESETS:
        raise OptionError(f"unknown classifier preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_train, n_test = int(SPLIT[0] * n), int(SPLIT[1] * n)
    return order[:n_train], order[n_train:n_train + n_test], order[n_train + n_test:]


def classifier_test(reference: np.ndarray, generated: np.ndarray, preset: ClassifierPreset,
                    seed: int = 0, device: str = "cpu",
                    progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train the classifier on ``reference`` ``(N1, d)`` vs ``generated`` ``(N2, d)`` inputs.

    Returns a dict with ``auc``, ``jsd``, ``best_epoch``, ``epochs_run`` and the split sizes.
    """
    import torch
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    for label, array in (("reference", reference), ("generated", generated)):
        if len(array) < MIN_SHOWERS_PER_CLASS:
            raise CaloforgeError(f"the classifier needs at least {MIN_SHOWERS_PER_CLASS} "
                                 f"{label} showers for its train/test/validation split, got "
                                 f"{len(array)}")
    rng = np.random.default_rng(seed)
    parts = [_split(len(reference), rng), _split(len(generated), rng)]

    def gather(which: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([reference[parts[0][which]], generated[parts[1][which]]])
        y = np.concatenate([np.zeros(len(parts[0][which])), np.ones(len(parts[1][which]))])
        return x.astype(np.float32), y.astype(np.float32)

    (x_train, y_train), (x_test, y_test), (x_val, y_val) = gather(0), gather(1), gather(2)
    if preset.standardise:
        mean, std = x_train.mean(axis=0), x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train, x_test, x_val = ((x - mean) / std for x in (x_train, x_test, x_val))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(x_train.shape[1], preset.hidden), torch.nn.LeakyReLU(),
            torch.nn.Dropout(preset.dropout),
            torch.nn.Linear(preset.hidden, preset.hidden), torch.nn.LeakyReLU(),
            torch.nn.Dropout(preset.dropout),
            torch.nn.Linear(preset.hidden, 1)).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=preset.learning_rate)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        xt = torch.from_numpy(x_train).to(device)
        yt = torch.from_numpy(y_train).to(device)
        generator = torch.Generator().manual_seed(seed)
        best_accuracy, best_state, best_epoch, stale = -1.0, None, 0, 0
        epochs = range(preset.max_epochs)
        if progress is not None:
            epochs = progress(epochs, total=preset.max_epochs, desc="classifier", unit="epoch")
        epochs_run = 0
        for epoch in epochs:
            model.train()
            order = torch.randperm(len(xt), generator=generator).to(device)
            for start in range(0, len(order), preset.batch_size):
                index = order[start:start + preset.batch_size]
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[index]).squeeze(1), yt[index])
                loss.backward()
                optimiser.step()
            epochs_run = epoch + 1
            accuracy = float(((_predict(model, x_test, device) > 0.5) == y_test).mean())
            if accuracy > best_accuracy:
                best_accuracy, best_epoch, stale = accuracy, epoch + 1, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if preset.patience is not None and stale >= preset.patience:
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
            "test_accuracy": best_accuracy, "n_train": len(x_train), "n_test": len(x_test),
            "n_val": len(x_val), "seed": seed}


def _predict(model: Any, x: np.ndarray, device: str, batch: int = 10_000) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[start:start + batch]).to(device)).squeeze(1)
            out.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def repeated_classifier_test(reference: np.ndarray, generated: np.ndarray, preset_name: str,
                             repeats: int = 3, seed: int = 0, device: str = "cpu",
                             progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``classifier_test`` over ``repeats`` seeds: mean and std of AUC and JSD, and each run."""
    if repeats < 1:
        raise OptionError(f"--repeats must be >= 1, got {repeats}")
    preset = get_preset(preset_name)
    runs = [classifier_test(reference, generated, preset, seed + k, device, progress)
            for k in range(repeats)]
    aucs = np.array([r["auc"] for r in runs])
    jsds = np.array([r["jsd"] for r in runs])
    return {"auc_mean": float(aucs.mean()), "auc_std": float(aucs.std()),
            "jsd_mean": float(jsds.mean()), "jsd_std": float(jsds.std()),
            "preset": asdict(preset), "repeats": repeats, "runs": runs}
