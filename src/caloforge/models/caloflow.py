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

import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zuko.distributions import DiagNormal
from zuko.flows import Flow, UnconditionalDistribution
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.transforms import MonotonicRQSTransform

from ..data import ShowerData
from ..errors import OptionError
from ..geometry import Geometry
from ..preprocessing import ConditionTransform, LayerEnergyTransform, VoxelTransform
from ..training import TrainingConfig, check_known_options
from .base import ConditionedModel, shard_generator


@dataclass
class FlowConfig:
    """One MAF: ``blocks`` MADE-RQS transforms with ``hidden`` layer widths."""

    blocks: int = 6
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    bins: int = 8
    bound: float = 14.0
    # Sequential passes per block when sampling. None: fully autoregressive (one pass per
    # feature, the published MAF). k: features split into k groups in autoregressive order,
    # each group conditioned on the previous ones (block-autoregressive, k passes).
    passes: int | None = None


@dataclass
class CaloFlowConfig:
    flow1: FlowConfig = field(default_factory=FlowConfig)
    flow2: FlowConfig = field(default_factory=lambda: FlowConfig(blocks=4, hidden=[256]))
    noise_mev: float = 1e-3
    threshold_mev: float = 0.01
    logit_alpha: float = 1e-6
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CaloFlowConfig":
        return flows_config_from_dict(cls, values, "CaloFlow")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flows_config_from_dict(config_class: Any, values: dict[str, Any], what: str) -> Any:
    """A flows config dataclass from (partial) options: each ``FlowConfig`` and the
    ``TrainingConfig`` section merged onto the defaults, scalars cast to the default's type
    (a default of None takes a float)."""
    check_known_options(config_class, values, what)
    out = config_class()
    for name, value in values.items():
        current = getattr(out, name)
        try:
            if isinstance(current, FlowConfig):
                check_known_options(FlowConfig, value, f"{name}")
                value = FlowConfig(**{**asdict(current), **value})
            elif isinstance(current, TrainingConfig):
                value = TrainingConfig.from_dict({**asdict(current), **value})
            elif value is not None:
                value = float(value) if current is None else type(current)(value)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"bad {what} option {name}: {exc}") from None
        setattr(out, name, value)
    return out


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


def layer_orders(layer_sizes: list[int], blocks: int, seed: int) -> list[torch.Tensor]:
    """Autoregressive orders for Flow II: layers in sequence (reversed every other block),
    a random permutation of the voxels within each layer. Returns each voxel's rank."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(layer_sizes)])
    orders = []
    for block in range(blocks):
        layers = range(len(layer_sizes)) if block % 2 == 0 else reversed(range(len(layer_sizes)))
        sequence = np.concatenate([offsets[i] + rng.permutation(layer_sizes[i]) for i in layers])
        rank = np.empty_like(sequence)
        rank[sequence] = np.arange(len(sequence))
        orders.append(torch.as_tensor(rank, dtype=torch.long))
    return orders


class RQSpline(MonotonicRQSTransform):
    """zuko's monotonic rational-quadratic spline with a faster constructor.

    Same maths as :class:`zuko.transforms.MonotonicRQSTransform` (whose ``_call``,
    ``_inverse`` and Jacobian it uses unchanged): the soft clipping bounds the unconstrained
    widths and heights by |log slope| / 2, so the softmax over the bins can be taken as
    exp / sum without subtracting the maximum. ``torch.softmax`` over a last dimension of
    8 bins is the single most expensive step of sampling on a CPU (about 30 ns per element);
    this is 2-3x cheaper. Parameter shapes: widths, heights ``(*, K)``; derivatives
    ``(*, K - 1)``.
    """

    def __init__(self, widths: torch.Tensor, heights: torch.Tensor,
                 derivatives: torch.Tensor, bound: float = 5.0, slope: float = 1e-3) -> None:
        torch.distributions.Transform.__init__(self)
        log_slope = math.log(slope)
        widths = torch.exp(widths / (1 + abs(2 * widths / log_slope)))
        heights = torch.exp(heights / (1 + abs(2 * heights / log_slope)))
        derivatives = derivatives / (1 + abs(derivatives / log_slope))
        widths = F.pad(torch.cumsum(widths, dim=-1), (1, 0), value=0)
        heights = F.pad(torch.cumsum(heights, dim=-1), (1, 0), value=0)
        # cumulative sums normalised by their last entry = cumsum of the softmax
        self.horizontal = bound * (2 * widths / widths[..., -1:] - 1)
        self.vertical = bound * (2 * heights / heights[..., -1:] - 1)
        self.derivatives = torch.exp(F.pad(derivatives, (1, 1), value=0))

    @property
    def inv(self) -> torch.distributions.Transform:
        """The inverse, not cached. torch's ``Transform.inv`` keeps the inverse in
        ``self._inv`` while the inverse refers back to ``self``: a reference cycle that
        only the garbage collector frees, so every spline's parameters (B, S, K) stayed
        alive for many layers of sampling (measured: 1.9 GB extra at 400 showers of
        calochallenge-3 with a student, 0.1 GB without the cycle)."""
        return torch.distributions.transforms._InverseTransform(self)


def inverse_spline(widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor,
                   bound: float) -> torch.distributions.Transform:
    """The inverse of :class:`RQSpline` (the univariate transform of a student's block)."""
    return RQSpline(widths, heights, derivatives, bound=bound).inv


def build_maf(features: int, context: int, config: FlowConfig,
              orders: list[torch.Tensor] | None = None, inverse: bool = False) -> Flow:
    """A conditional MAF of ``config.blocks`` MADE-RQS transforms (zuko).

    ``inverse=True`` builds the inverse-autoregressive twin used as a distillation student:
    block i maps z-side values to x-side values in ONE network pass, ``h_{i-1} =
    spline(h_i; theta(h_{i,<j}))^-1``, with the same spline parametrisation and the same
    autoregressive order as the teacher's block i, so that every block output and spline
    parameter can be matched to the teacher's. Its density (x -> z) is the slow,
    sequential direction.
    """
    if orders is None:
        ascending = torch.arange(features)
        orders = [ascending if i % 2 == 0 else torch.flipud(ascending)
                  for i in range(config.blocks)]
    univariate = partial(inverse_spline if inverse else RQSpline, bound=config.bound)
    transforms = [
        MaskedAutoregressiveTransform(
            features=features, context=context, order=orders[i], passes=config.passes,
            univariate=univariate,
            shapes=[(config.bins,), (config.bins,), (config.bins - 1,)],
            hidden_features=list(config.hidden))
        for i in range(config.blocks)]
    if inverse:
        transforms = [t.inv for t in transforms]
    base = UnconditionalDistribution(DiagNormal, loc=torch.zeros(features),
                                     scale=torch.ones(features), buffer=True)
    return Flow(transforms, base)


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


class LayerEnergyFlows(ConditionedModel):
    """What CaloFlow and iCaloFlow share: a flow for the layer energies given the context
    (Flow I / Flow-1) and voxel flows conditioned on standardised log layer energies.

    Fitted preprocessing (saved with the model): the context (:class:`ConditionTransform`),
    the layer-energy u-space (:class:`LayerEnergyTransform`), the voxel transform and the
    mean/std of log10 of each layer's energy. Subclasses set ``config_class`` and provide
    ``_new_module()`` and ``_log_prob(batch, generator)`` ``(B,)``.
    """

    config_class: Any
    voxel_transform_class: Any = VoxelTransform
    inverse_autoregressive = False  # True: the voxel flows are distilled IAF students
    log_prob_batch_size = 2048
    # zuko's spline inverse materialises per-bin intermediates: sampling peaks at about
    # 10 kB per (shower x voxel) of one network pass (3.9 GB for 1000 showers of 368
    # voxels), so batches are split to stay within this budget whatever batch size the
    # caller asks for.
    sampling_memory_bytes = 2e9
    bytes_per_shower_voxel = 10.5e3
    # Larger micro-batches only add cache misses on a CPU: the student samples at 0.60
    # ms/shower in micro-batches of 1000 and 0.98 in batches of 3600 (368 voxels, 1 thread).
    max_micro_batch = 1000
    # default dequantisation noise as a fraction of the readout threshold (published: 5 keV
    # under a 15 keV cut)
    noise_per_threshold = 1 / 3

    def __init__(self, geometry: Geometry, config: Any,
                 voxel_transform: VoxelTransform) -> None:
        super().__init__(geometry)
        self.config = config
        self.conditions = ConditionTransform()
        self.layer_transform = LayerEnergyTransform(geometry.n_layers, alpha=config.logit_alpha)
        self.voxel_transform = voxel_transform
        self.layer_log_mean = [0.0] * geometry.n_layers
        self.layer_log_std = [1.0] * geometry.n_layers
        self.module: Any = None

    @property
    def voxels_per_pass(self) -> int:
        """Voxels one network pass of the voxel flows handles."""
        return self.geometry.n_voxels

    def micro_batch(self, batch_size: int) -> int:
        """Showers per network call: the caller's batch size within the memory budget."""
        by_memory = int(self.sampling_memory_bytes / (self.bytes_per_shower_voxel
                                                      * self.voxels_per_pass))
        return max(1, min(batch_size, self.max_micro_batch, by_memory))

    def _fit_preprocessing(self, data: ShowerData) -> None:
        self.conditions.fit(data.incident_energies, data.conditions, data.condition_units)
        layer_energies = self.geometry.layer_energies(data.showers, dtype=np.float64)
        # the expected dequantisation noise of each layer
        noisy = layer_energies + 0.5 * self.voxel_transform.noise_mev * np.asarray(
            self.geometry.layer_sizes)
        self.layer_transform.fit(noisy, data.incident_energies)
        log_layers = np.log10(noisy)
        self.layer_log_mean = log_layers.mean(0).tolist()
        self.layer_log_std = np.maximum(log_layers.std(0), 1e-3).tolist()

    def _fit_threshold(self, data: ShowerData) -> None:
        """Geometries without a readout threshold (ild-ecal, lhcb-ecal) take the smallest
        non-zero cell of the training sample (the simulation's cut), the dequantisation
        noise ``noise_per_threshold`` times it, unless the config sets them (a 10 keV
        default would let the flows' values between 10 keV and the real cut, 2.4 MeV for
        the ILD ECAL, survive as extra hits)."""
        if getattr(self.config, "threshold_mev", 0.0) is not None or \
                self.geometry.threshold_mev > 0:
            return
        positive = data.showers[data.showers > 0]
        if positive.size == 0:
            return
        self.voxel_transform.threshold_mev = float(positive.min())
        if self.config.noise_mev is None:
            self.voxel_transform.noise_mev = \
                self.voxel_transform.threshold_mev * self.noise_per_threshold

    def _layer_context(self, layer_energies: torch.Tensor) -> torch.Tensor:
        """Standardised log10 of the layer energies ``(B, L)`` MeV -> ``(B, L)``."""
        mean = torch.as_tensor(self.layer_log_mean, dtype=layer_energies.dtype,
                               device=layer_energies.device)
        std = torch.as_tensor(self.layer_log_std, dtype=layer_energies.dtype,
                              device=layer_energies.device)
        floor = self.voxel_transform.noise_mev * 1e-3
        return (torch.log10(layer_energies.clamp(min=floor)) - mean) / std

    def _log_prob(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None
                  ) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, data: ShowerData, device: str = "cpu") -> np.ndarray:
        """Log-likelihood ``(N,)`` of each shower in the flows' (preprocessed) space, nats."""
        self._require_module()
        tensors = self.to_tensors(data)
        generator = torch.Generator().manual_seed(0)
        out = []
        self.module.to(device).eval()
        step = self.log_prob_batch_size
        with torch.inference_mode():
            for start in range(0, len(data), step):
                batch = {k: v[start:start + step].to(device) for k, v in tensors.items()}
                out.append(self._log_prob(batch, generator).cpu().numpy())
        return np.concatenate(out)

    # --- layer-by-layer sampling -------------------------------------------------------
    def _sampling_contexts(self, energies: np.ndarray, conditions: dict[str, np.ndarray],
                           batch_size: int, device: str
                           ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        """Micro-batch spans ``[(start, stop)]`` over the showers and their contexts
        ``(stop - start, C)`` on ``device`` (layer-by-layer samplers)."""
        n = len(energies)
        step = self.micro_batch(batch_size)
        spans = [(start, min(start + step, n)) for start in range(0, n, step)]
        contexts = [self._context(self._condition_batch(energies, conditions, a, b, device))
                    for a, b in spans]
        return spans, contexts

    def _start_layer_sampling(self, energies: np.ndarray, conditions: dict[str, np.ndarray],
                              seed: int, shard: int, batch_size: int, device: str
                              ) -> tuple[list[tuple[int, int]], list[torch.Tensor],
                                         torch.Generator, torch.Tensor, torch.Tensor]:
        """What a layer-by-layer sampler needs before its first layer (call under
        ``torch.inference_mode``): micro-batch spans and contexts, the shard's generator
        (its first draw is the energy flow's base noise), the layer energies ``(N, L)``
        MeV and their standardised logs ``(N, L)``."""
        assert self.module is not None
        self.module.to(device).eval()
        generator = shard_generator(seed, shard)
        spans, contexts = self._sampling_contexts(energies, conditions, batch_size, device)
        layer_energies = self._sample_flow1(spans, contexts, energies, generator, device)
        return spans, contexts, generator, layer_energies, self._layer_context(layer_energies)

    def _sample_flow1(self, spans: list[tuple[int, int]], contexts: list[torch.Tensor],
                      energies: np.ndarray, generator: torch.Generator, device: str
                      ) -> torch.Tensor:
        """Layer energies ``(N, L)`` MeV from the energy flow, base noise drawn first from
        ``generator`` for the whole shard."""
        assert self.module is not None
        module = self.module.to(device).eval()
        z1 = torch.randn(len(energies), self.geometry.n_layers, generator=generator)
        e_inc = torch.as_tensor(energies, dtype=torch.float32, device=device)
        return torch.cat([
            self.layer_transform.inverse(module.flow1(context).transform.inv(z1[a:b].to(device)),
                                         e_inc[a:b])
            for (a, b), context in zip(spans, contexts)])

    # --- training ---------------------------------------------------------------------
    def prepare_fit(self, train: ShowerData, resume: bool, device: str) -> None:
        """Fit the preprocessing and build the flows (a resumed run has both already)."""
        if not resume:
            self._fit_preprocessing(train)
            self._build_module()
        self._require_module()

    def _build_module(self) -> None:
        torch.manual_seed(self.config.training.seed)
        self.module = self._new_module()

    def _new_module(self) -> torch.nn.Module:
        raise NotImplementedError

    # --- persistence ------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "conditions": self.conditions.state(),
                "layer_transform": self.layer_transform.state(),
                "voxel_transform": self.voxel_transform.state(),
                "layer_log_mean": self.layer_log_mean, "layer_log_std": self.layer_log_std}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry | None = None) -> Any:
        assert geometry is not None
        model = cls(geometry, cls.config_class.from_dict(state["config"]))
        model.conditions = ConditionTransform.from_state(state["conditions"])
        model.layer_transform = LayerEnergyTransform.from_state(state["layer_transform"])
        model.voxel_transform = cls.voxel_transform_class.from_state(state["voxel_transform"])
        model.layer_log_mean = list(state["layer_log_mean"])
        model.layer_log_std = list(state["layer_log_std"])
        model._restore_extra_state(state)
        model.module = model._new_module()
        return model

    def _restore_extra_state(self, state: dict[str, Any]) -> None:
        """Fitted state a subclass adds to ``to_json_state``."""


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

    @staticmethod
    def preset(name: str) -> CaloFlowConfig:
        if name not in PRESETS:
            raise OptionError(f"unknown CaloFlow preset {name!r}; choose from {', '.join(PRESETS)}")
        return PRESETS[name]()

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
        energies, conditions = self._sampling_inputs(incident_energies, conditions)
        assert self.module is not None
        module = self.module.to(device).eval()
        n = len(energies)
        batch_size = self.micro_batch(batch_size)
        out = np.empty((n, self.geometry.n_voxels), dtype=np.float32)
        # All base noise of the shard comes from one (seed, shard) generator, drawn up front,
        # so the showers do not depend on the batch size.
        generator = shard_generator(seed, shard)
        z1 = torch.randn(n, self.geometry.n_layers, generator=generator)
        z2 = torch.randn(n, self.geometry.n_voxels, generator=generator)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch = self._condition_batch(energies, conditions, start, stop, device)
                e_inc = batch["incident_energy"]
                context = self._context(batch)
                x1 = module.flow1(context).transform.inv(z1[start:stop].to(device))
                layer_energies = self.layer_transform.inverse(x1, e_inc)
                context2 = torch.cat([context, self._layer_context(layer_energies)], dim=1)
                x2 = module.flow2(context2).transform.inv(z2[start:stop].to(device))
                voxels = self.voxel_transform.inverse(torch.nan_to_num(x2, nan=-20.0),
                                                      layer_energies)
                out[start:stop] = voxels.cpu().numpy()
        return self._sampled_data(energies, out, conditions)


__all__ = ["CaloFlow", "CaloFlowConfig", "FlowConfig", "LayerEnergyFlows", "PRESETS"]
