"""The interface every model family implements, and safe model files.

A model is an estimator: ``fit`` on a :class:`~caloforge.data.ShowerData`, ``sample`` showers
for given incident energies (and conditions), ``log_prob`` where a likelihood exists,
``save`` / ``load`` a directory. Training, generation and evaluation only use this interface.

Model files: ``model-<digest>.safetensors`` (weights; no pickle) and ``model.json`` (family,
config, geometry, fitted preprocessing, training summary, versions, and the name and SHA-256
of the weights file). ``model.json`` is the manifest: it is renamed into place last, so a
save killed at any moment leaves either the previous model or the new one, never a mix.
Loading reads only the weights file the manifest names and never executes code from the
files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .._version import __version__
from ..atomic import atomic_output, write_json_atomic
from ..data import ShowerData, ShowerStream
from ..errors import CaloforgeError, OptionError
from ..geometry import Geometry
from ..runtime import stop_if_terminated
from ..training import LoopState, TrainingHooks, fit_model

if TYPE_CHECKING:
    import torch

MODEL_JSON = "model.json"
LEGACY_MODEL_WEIGHTS = "model.safetensors"  # before versioned names: a manifest without "weights"
_WEIGHTS_NAME = re.compile(r"model(-[0-9a-f]{16})?\.safetensors")
FORMAT_VERSION = 1


def weights_file_name(sha256: str) -> str:
    """The versioned name of the weights whose SHA-256 is ``sha256``."""
    return f"model-{sha256[:16]}.safetensors"


class ShowerModel(ABC):
    """Base class of all model families.

    Subclasses set ``family`` and implement ``fit``, ``sample``, ``to_json_state`` /
    ``from_json_state`` and expose their torch module as ``module``.
    """

    family: ClassVar[str]
    module: Any  # torch.nn.Module
    # whether ``log_prob`` gives the likelihood of showers (the flows) or raises (the GANs)
    has_likelihood: ClassVar[bool] = False

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

    def check_conditions(self, incident_energies: np.ndarray,  # noqa: B027 (a no-op hook)
                         conditions: dict[str, np.ndarray], source: str) -> None:
        """Raise a CaloforgeError if the inputs leave the training range (no check by
        default)."""

    @abstractmethod
    def to_json_state(self) -> dict[str, Any]:
        """Everything but the weights, JSON-serialisable."""

    @classmethod
    @abstractmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry) -> ShowerModel:
        """Rebuild an untrained model (with fitted preprocessing) of ``geometry`` from
        ``to_json_state``."""

    # --- files --------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Replace the model in ``directory`` as a unit: the weights go to a new file named
        by their digest (``model-<sha256[:16]>.safetensors``), then ``model.json``, which
        names that file and its SHA-256, is renamed into place (the commit), then weights
        files it does not name are removed. A save killed before the commit leaves the
        previous model loadable; after it, the new one; a stray weights file is removed by
        the next save."""
        from safetensors.torch import save

        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        weights = save(tensors, metadata={"family": self.family})
        weights_sha256 = hashlib.sha256(weights).hexdigest()
        weights_name = weights_file_name(weights_sha256)
        with atomic_output(os.path.join(directory, weights_name)) as tmp:
            with open(tmp, "wb") as stream:
                stream.write(weights)
        write_json_atomic(os.path.join(directory, MODEL_JSON), {
            "format_version": FORMAT_VERSION, "family": self.family,
            "geometry": self.geometry.to_dict(), "state": self.to_json_state(),
            "training": self.training_summary, "weights": weights_name,
            "weights_sha256": weights_sha256, "versions": _versions()})
        for name in os.listdir(directory):
            if _WEIGHTS_NAME.fullmatch(name) and name != weights_name:
                os.remove(os.path.join(directory, name))


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The torch generator all sampling noise of one (seed, shard) comes from."""
    import torch

    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, shard]).generate_state(1)[0]))


class ConditionedModel(ShowerModel, TrainingHooks):
    """A model trained by the shared :class:`~caloforge.training.Trainer`, conditioned on
    the incident energy and the file's extra conditions through a fitted
    :class:`~caloforge.preprocessing.ConditionTransform` (``self.conditions``).

    Subclasses provide ``config`` (with a ``training`` section), ``module`` (None until
    built), ``prepare_fit(train_data, resume, device)`` (fit the preprocessing and build the
    module unless resuming) and the hooks of :class:`~caloforge.training.TrainingHooks`
    the Trainer calls (at least ``loss``).
    Batches are dicts of tensors: ``incident_energy`` ``(B,)`` MeV, ``voxels``
    ``(B, n_voxels)`` MeV and ``condition.<name>`` ``(B, k)``.
    """

    conditions: Any  # ConditionTransform
    config: Any
    # named configurations: name -> a function returning a fresh config (or, for a
    # distilled student, a DistillationConfig)
    PRESETS: ClassVar[dict[str, Callable[[], Any]]] = {}

    @classmethod
    def preset(cls, name: str) -> Any:
        """A fresh copy of the named configuration (an OptionError listing the presets)."""
        if name not in cls.PRESETS:
            raise OptionError(f"unknown {cls.family} preset {name!r}; choose from "
                              f"{', '.join(cls.PRESETS)}")
        return cls.PRESETS[name]()
    def fit(self, data: ShowerData | ShowerStream, run_dir: str, resume: bool = False,
            device: str = "cpu", progress: Any = None, metadata: dict[str, Any] | None = None
            ) -> dict[str, Any]:
        """Train on ``data`` (showers in memory, or a :class:`~caloforge.data.ShowerStream`
        read block by block where the family supports it): see
        :func:`~caloforge.training.fit_model`."""
        return fit_model(self, data, run_dir, resume, device, progress, metadata)

    @abstractmethod
    def prepare_fit(self, train: ShowerData, resume: bool, device: str) -> None:
        """Fit the preprocessing on ``train`` and build the module (unless resuming)."""

    def fit_condition_range(self, incident_energies: np.ndarray,
                            conditions: dict[str, np.ndarray], units: dict[str, str]) -> None:
        """Record the training range of the conditions (every training shower of a stream,
        where ``prepare_fit`` saw a subsample)."""
        self.conditions.fit(incident_energies, conditions, units)

    def on_best(self, run_dir: str, state: LoopState) -> None:
        """Save the model as it is at the best epoch so far (marked in progress)."""
        self.training_summary = {"epochs": state.epoch, "best_epoch": state.best_epoch,
                                 "best_val_loss": state.best_val, "in_progress": True}
        self.save(run_dir)

    def _require_module(self) -> None:
        if self.module is None:
            raise CaloforgeError("the model is not fitted")

    def to_tensors(self, data: ShowerData, index: np.ndarray | slice = slice(None)
                 ) -> dict[str, torch.Tensor]:
        """A batch dict (float32 tensors) of ``data[index]``."""
        import torch

        tensors = {"incident_energy": torch.as_tensor(data.incident_energies[index],
                                                      dtype=torch.float32),
                   "voxels": torch.as_tensor(data.showers[index], dtype=torch.float32)}
        for name in self.conditions.names:
            tensors[f"condition.{name}"] = torch.as_tensor(data.conditions[name][index],
                                                           dtype=torch.float32)
        return tensors

    # --- sampling from noise: what `sample` runs and `caloforge export` traces -----------
    def noise_features(self) -> int | None:
        """Standard-normal numbers one shower is drawn from when the family maps noise to a
        shower with :meth:`showers_from_noise`; None: it samples otherwise."""
        return None

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """All the noise of ``n`` showers, ``(n, noise_features)``, drawn up front from the
        shard's generator (so that showers do not depend on the batch size)."""
        import torch

        features = self.noise_features()
        assert features is not None
        return torch.randn(n, features, generator=generator)

    def showers_from_noise(self, noise: torch.Tensor, batch: dict[str, torch.Tensor]
                           ) -> torch.Tensor:
        """Showers ``(B, n_voxels)`` MeV from noise ``(B, noise_features)`` and the
        conditions of ``batch``, in torch operations only (the exported graph is this
        function traced). Families with ``noise_steps`` get the loop over their steps."""
        import torch

        if not self.noise_steps:
            raise CaloforgeError(f"{self.family} does not map noise to showers in one function")
        state = self.noise_prologue(noise, batch)
        cells = []
        for step in range(self.noise_steps):
            step_cells, changed = self.noise_step(step, noise, state)
            cells.append(step_cells)
            state.update(changed)
        return torch.cat(cells, dim=1)

    # Families whose showers_from_noise is a long chain of similar steps (convflow: one
    # flow per layer) also split it into steps, so that `caloforge export` can export each
    # step as its own small ONNX graph and join them (the ONNX exporter slows down far more
    # than linearly with the size of one graph). showers_from_noise is then noise_prologue,
    # then noise_step for steps 0 .. noise_steps - 1, cells concatenated.
    noise_steps = 0

    def noise_prologue(self, noise: torch.Tensor, batch: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """The named tensors ``(B, ...)`` the first step needs."""
        raise CaloforgeError(f"{self.family} does not split showers_from_noise into steps")

    def noise_step(self, step: int, noise: torch.Tensor, state: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step ``step``'s voxels ``(B, n_step_voxels)`` MeV and the state entries it
        changes."""
        raise CaloforgeError(f"{self.family} does not split showers_from_noise into steps")

    def micro_batch(self, batch_size: int) -> int:
        """Showers per network call for a caller's ``batch_size`` (families cap it by
        memory)."""
        return max(1, batch_size)

    def _sample_from_noise(self, incident_energies: np.ndarray,
                           conditions: dict[str, np.ndarray] | None, seed: int, shard: int,
                           batch_size: int, device: str) -> ShowerData:
        """``sample`` for a family with :meth:`showers_from_noise`: the noise of the shard
        drawn up front, then micro-batches under ``torch.inference_mode``."""
        import torch

        energies, conditions = self._sampling_inputs(incident_energies, conditions)
        assert self.module is not None
        n, batch_size = len(energies), self.micro_batch(batch_size)
        noise = self.draw_noise(n, shard_generator(seed, shard))
        out = np.empty((n, self.geometry.n_voxels), dtype=np.float32)
        module = self.module.to(device)
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode():
                for start in range(0, n, batch_size):
                    stop_if_terminated()
                    stop = min(start + batch_size, n)
                    batch = self._condition_batch(energies, conditions, start, stop, device)
                    showers = self.showers_from_noise(noise[start:stop].to(device), batch)
                    out[start:stop] = showers.cpu().numpy()
        finally:
            module.train(was_training)
        return self._sampled_data(energies, out, conditions)

    def _context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Standardised conditions ``(B, n_context)`` of a batch."""
        conditions = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("condition.")}
        return self.conditions.forward(batch["incident_energy"], conditions)

    def _sampling_inputs(self, incident_energies: np.ndarray,
                         conditions: dict[str, np.ndarray] | None
                         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Check the model is fitted; E_inc as float64 ``(N,)`` and a copy of the conditions."""
        self._require_module()
        return (np.asarray(incident_energies, dtype=np.float64).reshape(-1),
                dict(conditions or {}))

    def _condition_batch(self, energies: np.ndarray, conditions: dict[str, np.ndarray],
                         start: int, stop: int, device: str) -> dict[str, torch.Tensor]:
        """The conditions of showers ``start:stop`` as a batch dict on ``device``."""
        import torch

        missing = [n for n in self.conditions.names if n not in conditions]
        if missing:
            raise CaloforgeError(f"the model needs condition(s) {missing} to sample")
        batch = {"incident_energy": torch.as_tensor(energies[start:stop], dtype=torch.float32,
                                                    device=device)}
        for name in self.conditions.names:
            batch[f"condition.{name}"] = torch.as_tensor(
                np.asarray(conditions[name])[start:stop], dtype=torch.float32, device=device)
        return batch

    def _sampled_data(self, energies: np.ndarray, showers: np.ndarray,
                      conditions: dict[str, np.ndarray]) -> ShowerData:
        units = {k: self.conditions.units.get(k, "") for k in conditions}
        return ShowerData(energies, showers, {k: np.asarray(v) for k, v in conditions.items()},
                          units)

    def check_conditions(self, incident_energies: np.ndarray,
                         conditions: dict[str, np.ndarray], source: str) -> None:
        self.conditions.check_range(incident_energies, conditions, source)


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
            description = json.load(stream)
    except (OSError, ValueError) as exc:
        raise CaloforgeError(f"{path}: unreadable model description ({exc})") from None
    check_model_description(description, path)
    return description


# the fields of model.json and their JSON types
_DESCRIPTION_FIELDS = {"format_version": int, "family": str, "geometry": dict, "state": dict,
                       "training": dict}


def check_model_description(description: Any, path: str) -> None:
    """Raise a CaloforgeError naming ``path`` unless ``description`` has the fields of a
    model.json with their types and a format version this caloforge reads."""
    if not isinstance(description, dict):
        raise CaloforgeError(f"{path}: a model description is a JSON object, got "
                             f"{type(description).__name__}")
    for name, kind in _DESCRIPTION_FIELDS.items():
        if name not in description:
            raise CaloforgeError(f"{path}: model description lacks {name!r}")
        if not isinstance(description[name], kind) or isinstance(description[name], bool):
            raise CaloforgeError(f"{path}: {name!r} must be a JSON {kind.__name__}, got "
                                 f"{type(description[name]).__name__}")
    for name in ("weights", "weights_sha256"):
        if not isinstance(description.get(name, ""), str):
            raise CaloforgeError(f"{path}: {name!r} must be a JSON str")
    if not _WEIGHTS_NAME.fullmatch(description.get("weights", LEGACY_MODEL_WEIGHTS)):
        raise CaloforgeError(f"{path}: 'weights' must name a model-<digest>.safetensors file "
                             f"beside it, got {description['weights']!r}")
    if not 1 <= description["format_version"] <= FORMAT_VERSION:
        raise CaloforgeError(f"{path}: model format version {description['format_version']} "
                             f"(this caloforge reads 1 to {FORMAT_VERSION})")


def weights_path(directory: str, description: dict[str, Any] | None = None) -> str:
    """The weights file the manifest (``model.json``, read unless ``description`` is given)
    of ``directory`` names."""
    if description is None:
        description = read_model_json(directory)
    return os.path.join(directory, description.get("weights", LEGACY_MODEL_WEIGHTS))


def recorded_weights_sha256(directory: str) -> str:
    """The SHA-256 of the weights in ``directory``: as its manifest records it (computed
    from the file for a manifest that predates recording it)."""
    from ..atomic import file_sha256

    description = read_model_json(directory)
    return description.get("weights_sha256") or file_sha256(weights_path(directory, description))


def load_weights(model: ShowerModel, directory: str, description: dict[str, Any]) -> None:
    """Load the weights file ``description`` (the run's model.json) names into
    ``model.module`` (strict: every tensor must match in name, shape and dtype, and be
    finite; the file must have the SHA-256 the description records)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = weights_path(directory, description)
    sha256 = description.get("weights_sha256")
    try:
        with open(path, "rb") as stream:
            raw = stream.read()  # read once: parsed and checked against the digest
        tensors = load(raw)
    except FileNotFoundError:
        raise CaloforgeError(f"{path}: missing model weights") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CaloforgeError(f"{path}: unreadable or truncated weights ({exc})") from None
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise CaloforgeError(f"{path}: not the weights {MODEL_JSON} describes (changed "
                             "after saving?); resume the run to rewrite them from its "
                             "checkpoint")
    expected = model.module.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tensor.dtype != expected[name].dtype:
            raise CaloforgeError(f"{path}: weight {name!r} is {tensor.dtype}, the model "
                                 f"needs {expected[name].dtype}")
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise CaloforgeError(f"{path}: weight {name!r} holds NaN or infinite values")
    try:
        model.module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CaloforgeError(f"{path}: weights do not match the model in {MODEL_JSON} "
                             f"({first})") from None
