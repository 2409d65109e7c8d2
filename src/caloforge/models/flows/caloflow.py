"""CaloFlow: two conditional masked autoregressive flows with rational-quadratic splines.

* Flow I learns the layer energies given the context (incident energy plus any extra
  conditions), in CaloFlow's u-space with a logit (:class:`LayerEnergyTransform`).
* Flow II learns the per-layer-normalised voxels given the context and the layer energies
  (dequantisation noise, per-layer normalisation, logit: :class:`VoxelTransform`), with the
  autoregressive order permuted within each calorimeter layer.

Sampling runs Flow I, then Flow II, renormalises each layer, scales it by its energy and
applies the threshold. Both flows are trained together on the sum of their negative
log-likelihoods (the joint likelihood of layer energies and normalised voxels), and the epoch
with the best validation likelihood is kept.

Flows come from zuko: ``MaskedAutoregressiveTransform`` with ``MonotonicRQSTransform``
and an explicit tail bound (the spline is the identity outside [-bound, bound]; zuko's NSF
would fix it at 5 while logit(1e-6) = -13.8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ...data import ShowerData
from ...geometry import Geometry
from ...preprocessing import VoxelTransform
from ...training import TrainingConfig, config_from_dict
from .distillation import DistilledStudent
from .layered import LayerEnergyFlows, finite_logits
from .toolkit import FlowConfig, build_maf, flow_inverse, layer_orders


@dataclass
class CaloFlowConfig:
    flow1: FlowConfig = field(default_factory=FlowConfig)
    flow2: FlowConfig = field(default_factory=lambda: FlowConfig(blocks=4, hidden=[256]))
    noise_mev: float = 1e-3
    threshold_mev: float = 0.01
    logit_alpha: float = 1e-6
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaloFlowConfig:
        return config_from_dict(cls, values, "CaloFlow")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_config() -> CaloFlowConfig:
    """Sized to train in about 30 minutes on 2 CPU cores for <= ~1000 voxels.

    Flow II is block-autoregressive (48 sequential groups per block): training costs the
    same, but sampling is ~15x cheaper than fully autoregressive (11 vs 187 ms/shower for
    368 voxels at batch 1000 on 2 threads), which keeps teacher sampling usable on a CPU.
    """
    return CaloFlowConfig(
        flow1=FlowConfig(blocks=6, hidden=[64, 64]),
        flow2=FlowConfig(blocks=4, hidden=[256], passes=48),
        training=TrainingConfig(epochs=40, batch_size=256, learning_rate=1e-3,
                                time_budget_s=30 * 60))


def _paper_config() -> CaloFlowConfig:
    """The published sizes (CaloFlow: Flow II 8 blocks of width ~ input size), for a GPU."""
    return CaloFlowConfig(
        flow1=FlowConfig(blocks=6, hidden=[64, 64]),
        flow2=FlowConfig(blocks=8, hidden=[512]),
        training=TrainingConfig(epochs=100, batch_size=500, learning_rate=1e-3))


def _tiny_config() -> CaloFlowConfig:
    """For tests: seconds on a CPU."""
    return CaloFlowConfig(flow1=FlowConfig(blocks=2, hidden=[16]),
                          flow2=FlowConfig(blocks=2, hidden=[32], passes=8),
                          training=TrainingConfig(epochs=2, batch_size=64))


PRESETS = {"cpu": _cpu_config, "paper": _paper_config, "tiny": _tiny_config}


class CaloFlowModule(torch.nn.Module):
    """Flow I (``flow1``) and Flow II (``flow2``); ``student=True``: Flow II is the
    inverse-autoregressive twin (:func:`build_maf` with ``inverse=True``)."""

    def __init__(self, n_context: int, layer_sizes: list[int], config: CaloFlowConfig,
                 student: bool = False) -> None:
        super().__init__()
        n_layers = len(layer_sizes)
        self.flow1 = build_maf(n_layers, n_context, config.flow1)
        self.flow2 = build_maf(sum(layer_sizes), n_context + n_layers, config.flow2,
                               layer_orders(layer_sizes, config.flow2.blocks, seed=0),
                               inverse=student)


class CaloFlow(LayerEnergyFlows):
    """The two-flow CaloFlow teacher on any geometry with ~1000 voxels or fewer.

    Example::

        model = CaloFlow(get_geometry("calochallenge-1-photons"), CaloFlow.preset("cpu"))
        model.fit(train_data, "runs/cf")
        generated = model.sample(reference.incident_energies, seed=1)
    """

    family = "caloflow"
    config_class = CaloFlowConfig

    def __init__(self, geometry: Geometry, config: CaloFlowConfig | None = None) -> None:
        config = config or _cpu_config()
        super().__init__(geometry, config, VoxelTransform(
            list(geometry.layer_sizes), config.noise_mev, config.threshold_mev,
            config.logit_alpha))

    PRESETS = PRESETS

    # --- likelihood -------------------------------------------------------------------
    def _log_prob(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                  ) -> torch.Tensor:
        assert self.module is not None
        context, x1, context2, x2 = self._flow_inputs(batch, generator)
        return self.module.flow1(context).log_prob(x1) + self.module.flow2(context2).log_prob(x2)

    def _flow_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context, Flow I input, Flow II context, Flow II input) of a batch of showers,
        with fresh dequantisation noise."""
        noisy = self.voxel_transform.add_noise(batch["voxels"], generator)
        layer_energies = self.voxel_transform.layer_sums(noisy)
        context = self._context(batch)
        x1 = self.layer_transform.forward(layer_energies, batch["incident_energy"])
        x2 = self.voxel_transform.forward(noisy, layer_energies)
        context2 = torch.cat([context, self._layer_context(layer_energies)], dim=1)
        return context, x1, context2, x2

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Mean negative log-likelihood per shower (nats, in the flows' space)."""
        return -self._log_prob(batch, generator).mean()

    def _new_module(self) -> CaloFlowModule:
        return CaloFlowModule(self.conditions.n_features, list(self.geometry.layer_sizes),
                              self.config, student=self.inverse_autoregressive)

    # --- sampling ---------------------------------------------------------------------
    def sample(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray] | None = None,
               seed: int = 0, shard: int = 0, batch_size: int = 10_000, device: str = "cpu",
               ) -> ShowerData:
        return self._sample_from_noise(incident_energies, conditions, seed, shard, batch_size,
                                       device)

    def noise_features(self) -> int:
        return self.geometry.n_layers + self.geometry.n_voxels

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Flow I's noise ``(n, L)``, then Flow II's ``(n, V)``, side by side."""
        z1 = torch.randn(n, self.geometry.n_layers, generator=generator)
        return torch.cat([z1, torch.randn(n, self.geometry.n_voxels, generator=generator)], 1)

    def showers_from_noise(self, noise: torch.Tensor, batch: dict[str, torch.Tensor]
                           ) -> torch.Tensor:
        """Flow I maps the first L numbers to layer energies, Flow II the other V to the
        voxels' shares of them; ``(B, V)`` MeV."""
        assert self.module is not None
        n_layers = self.geometry.n_layers
        e_inc = batch["incident_energy"]
        context = self._context(batch)
        x1 = flow_inverse(self.module.flow1, context, noise[:, :n_layers])
        layer_energies = self.layer_transform.inverse(x1, e_inc)
        context2 = torch.cat([context, self._layer_context(layer_energies)], dim=1)
        x2 = flow_inverse(self.module.flow2, context2, noise[:, n_layers:])
        return self.voxel_transform.inverse(finite_logits(x2), layer_energies)


class CaloFlowStudent(DistilledStudent, CaloFlow):
    """A CaloFlow whose Flow II is an inverse autoregressive flow distilled from a teacher.

    Example::

        teacher = load_model("runs/teacher")
        student = CaloFlowStudent.from_teacher(teacher, CaloFlowStudent.preset("cpu"),
                                               teacher_dir="runs/teacher")
        student.fit(train_data, "runs/student")
        generated = student.sample(reference.incident_energies, seed=1)
    """

    family = "caloflow-student"
    teacher_family = "caloflow"
    distilled_flows = ("flow2",)

    def _distillation_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                             every_layer: bool = False
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        _, _, context2, x2 = self._flow_inputs(batch, generator)
        return {"flow2": (x2, context2)}
