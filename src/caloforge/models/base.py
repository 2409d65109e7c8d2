"""The interface every model family implements, and safe model files.

A model is an estimator: ``fit`` on a :class:`~caloforge.data.ShowerData`, ``sample`` showers
for given incident energies (and conditions), ``log_prob`` where a likelihood exists,
``save`` / ``load`` a directory. Training, generation and evaluation only use this interface.

Model files: ``model.safetensors`` (weights; no pickle) and ``model.json`` (family, config,
geometry, fitted preprocessing, training summary, versions). Loading never executes code
from the files.
"""

from __future__ import annotations

import json
import os
import platform
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from .. import __version__
from ..atomic import atomic_output, write_json_atomic
from ..data import ShowerData
from ..errors import CaloforgeError
from ..geometry import Geometry

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


class ShowerModel(ABC):
    """Base class of all model families.

    Subclasses set ``family`` and implement ``fit``, ``sample``, ``to_json_state`` /
    ``from_json_state`` and expose their torch module as ``module``.
    """

    family: ClassVar[str]
    module: Any  # torch.nn.Module

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.training_summary: dict[str, Any] = {}

    @abstractmethod
    def fit(self, data: ShowerData, run_dir: str, resume: bool = False, device: str = "cpu",
            progress: Any = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train on ``data`` with checkpoints in ``run_dir``; return the training summary.

        ``metadata`` (e.g. the training file) is recorded in the saved model description."""

    @abstractmethod
    def sample(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray] | None = None,
               seed: int = 0, shard: int = 0, batch_size: int = 10_000, device: str = "cpu",
               ) -> ShowerData:
        """Generate one shower per incident energy (MeV); reproducible per (seed, shard)."""

    def log_prob(self, data: ShowerData, device: str = "cpu") -> np.ndarray:
        """Per-shower log-likelihood ``(N,)`` where the family has one."""
        raise CaloforgeError(f"model family {self.family!r} has no likelihood")

    def check_conditions(self, incident_energies: np.ndarray,
                         conditions: dict[str, np.ndarray], source: str) -> None:
        """Raise a CaloforgeError if the inputs leave the training range."""

    @abstractmethod
    def to_json_state(self) -> dict[str, Any]:
        """Everything but the weights, JSON-serialisable."""

    @classmethod
    @abstractmethod
    def from_json_state(cls, state: dict[str, Any]) -> "ShowerModel":
        """Rebuild an untrained model (with fitted preprocessing) from ``to_json_state``."""

    # --- files --------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write ``model.safetensors`` and ``model.json`` into ``directory`` (atomically)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        with atomic_output(os.path.join(directory, MODEL_WEIGHTS)) as tmp:
            save_file(tensors, tmp, metadata={"family": self.family})
        write_json_atomic(os.path.join(directory, MODEL_JSON), {
            "format_version": FORMAT_VERSION, "family": self.family,
            "geometry": self.geometry.to_dict(), "state": self.to_json_state(),
            "training": self.training_summary,
            "versions": _versions()})


def _versions() -> dict[str, str]:
    import torch
    import zuko

    return {"caloforge": __version__, "torch": torch.__version__, "zuko": zuko.__version__,
            "python": platform.python_version()}


def read_model_json(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MODEL_JSON)
    if not os.path.isdir(directory):
        raise CaloforgeError(f"{directory}: no such run directory")
    if not os.path.exists(path):
        raise CaloforgeError(f"{directory}: not a caloforge model directory (no {MODEL_JSON}; "
                             "has training saved a model yet?)")
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError) as exc:
        raise CaloforgeError(f"{path}: unreadable model description ({exc})") from None


def load_weights(model: ShowerModel, directory: str) -> None:
    """Load ``model.safetensors`` into ``model.module`` (strict: every tensor must match)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, MODEL_WEIGHTS)
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise CaloforgeError(f"{path}: missing model weights") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CaloforgeError(f"{path}: unreadable or truncated weights ({exc})") from None
    try:
        model.module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CaloforgeError(f"{path}: weights do not match the model in {MODEL_JSON} "
                             f"({first})") from None
