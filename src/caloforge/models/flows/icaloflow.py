"""iCaloFlow: inductive layer-to-layer flows for calorimeters with many voxels.

One flow over every voxel does not scale (calochallenge-2: 6,480 voxels, calochallenge-3:
40,500); iCaloFlow learns one calorimeter layer at a time, so network sizes and memory grow
with a layer, not with the shower:

* Flow-1: all layer energies ``(L,)`` given the conditions (CaloFlow's u-space + logit,
  :class:`~caloforge.preprocessing.LayerEnergyTransform`).
* Flow-2: the normalised first layer ``(S,)`` given the conditions and log E_0.
* Flow-3: ONE flow shared by layers 1 .. L-1: normalised layer n given the conditions,
  log E_n, log E_{n-1}, the normalised layer n-1 (in the flows' logit space, standardised)
  and the layer index (one-hot).

Voxels: uniform dequantisation noise (default a thirtieth of the geometry's readout
threshold: 0.5 keV for the CaloChallenge 15 keV), each layer divided by its energy, logit; after
generation each layer is renormalised, scaled by its Flow-1 energy and cut at the threshold,
or at a higher cut per layer calibrated after training so that the model makes as many hits
per layer as the training data has (``hit_calibration_showers``, :meth:`ICaloFlow.calibrate_hits`).
All three flows are MADE-RQS MAFs (zuko) trained together on the joint log-likelihood of a
shower, ``log p1 + log p2 + sum_n log p3(layer n)``; the epoch with the best validation
likelihood is kept. Every layer must have the same number of cells (true of the
CaloChallenge datasets 2 and 3 and of the ILD ECAL).

Sampling runs Flow-1, then the layers in order, each layer batched over all showers of the
shard with its own draw of base noise, so the showers depend on (seed, shard) only, not on
the batch size, and memory holds one shard's output plus one layer. Students for Flow-2 and
Flow-3 (one-pass IAFs, :class:`ICaloFlowStudent`) come from ``caloforge distill``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ...core_fraction import (
    CoreFractionMap,
    apply_core_fraction_maps,
    check_core_fraction_options,
    core_fraction_maps_from_state,
    fit_option_maps,
    hit_regressors_option,
)
from ...data import ShowerData, ShowerStream, first_showers
from ...errors import GeometryError, OptionError
from ...geometry import Geometry
from ...hit_counts import (
    HitCountModel,
    check_count_options,
    count_bands,
    counted_cells,
    fit_layer_counts,
)
from ...preprocessing import (
    LogitTransform,
    VoxelTransform,
    monotone_log_map,
    occupancy_cuts,
    quantile_map_nodes,
)
from ...training import TrainingConfig, config_from_dict
from ..base import shard_generator
from .distillation import DISTILLATION_PRESETS, DistillationConfig, DistilledStudent
from .layered import LayerEnergyFlows, finite_logits, threshold_and_noise
from .toolkit import FlowConfig, build_maf, flow_inverse, layer_orders


@dataclass
class ICaloFlowConfig:
    """Architecture and preprocessing of the three flows.

    ``noise_mev`` / ``threshold_mev``: None = a thirtieth of / the geometry's readout
    threshold (geometries without one: the smallest non-zero training cell).
    ``layers_per_shower``: Flow-3 terms per shower in a training step (0 = every layer; k:
    k random layers, the term scaled to an unbiased estimate), to bound memory on very
    large layers.
    ``hit_calibration_showers``: after training, the model samples the conditions of this
    many training showers and sets a cut per layer (>= the threshold) that leaves it as
    many hits per layer as those showers have (0: the readout threshold only; see
    :meth:`ICaloFlow.calibrate_hits`).
    ``postprocess``: ``none`` or ``spline``: after the hit calibration, a monotone map of
    the voxel spectrum fitted between generated and training voxels (the L2LFlows
    post-processing, on ``postprocess_showers`` showers; :meth:`ICaloFlow.fit_postprocess`).
    ``hit_counts``: ``layer`` draws each shower's number of hits per layer, ``band`` per
    radial band of a layer (``core-band``: the first radial row a band of its own), from a
    model fitted on the first ``hit_count_showers`` training
    showers given E_inc and every layer's energy
    (:class:`~caloforge.hit_counts.HitCountModel`, one more noise number per count); each
    layer then keeps that many of its highest voxels (the faint ones under the threshold
    too) at its deposit, instead of the hit cuts.
    ``core_fraction``: ``none``, ``calibrated``, ``rings`` or ``profile``: after those, each
    layer's
    share of its energy in the core (the first ``core_fraction_radius`` radial rows of a
    cylinder, the cells within that many cells of the axis of a square layer) mapped shower
    by shower so that its dependence on the layer energy, the share of the shower before
    the layer and E_inc is the data's (:class:`~caloforge.core_fraction.CoreFractionMap`,
    fitted on ``postprocess_showers`` showers; :meth:`ICaloFlow.fit_core_fraction`);
    ``rings``: one map per core of radius 1, 2, ... out to ``core_fraction_radius``, in
    that order (:func:`~caloforge.core_fraction.ring_radii`); ``profile``: the whole radial
    profile, one map per ring boundary from the outside in, each within the next ring
    (:func:`~caloforge.core_fraction.profile_radii`; the radius is not used).
    ``core_fraction_hits``: ``layer``: the maps also condition on the layer's hit count (at
    fixed energy a shower with more hits is broader; :mod:`caloforge.core_fraction`);
    ``parts``: on the hits of each map's core and of the rest of its cells (the energy
    then follows where the hits are).
    """

    flow1: FlowConfig = field(default_factory=lambda: FlowConfig(blocks=6, hidden=[128, 128]))
    flow2: FlowConfig = field(default_factory=lambda: FlowConfig(
        blocks=6, hidden=[256], passes=16))
    flow3: FlowConfig = field(default_factory=lambda: FlowConfig(
        blocks=6, hidden=[256], passes=16))
    noise_mev: float | None = None
    threshold_mev: float | None = None
    logit_alpha: float = 1e-6
    layers_per_shower: int = 0
    hit_calibration_showers: int = 1000
    postprocess: str = "none"
    postprocess_showers: int = 2000
    hit_counts: str = "none"
    hit_count_showers: int = 5000
    core_fraction: str = "none"
    core_fraction_radius: float = 2.0
    core_fraction_hits: str = "none"
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ICaloFlowConfig:
        # core_fraction_hits was a switch (true: the layer's hits) in files saved before
        values = {**values, "core_fraction_hits": hit_regressors_option(
            values.get("core_fraction_hits", "none"))}
        out = config_from_dict(cls, values, "iCaloFlow")
        if out.layers_per_shower < 0:
            raise OptionError(f"layers_per_shower must be >= 0, got {out.layers_per_shower}")
        if out.postprocess not in ("none", "spline"):
            raise OptionError(f"postprocess must be none or spline, got {out.postprocess!r}")
        check_count_options(out.hit_counts, out.hit_count_showers)
        check_core_fraction_options(out.core_fraction, out.core_fraction_radius,
                                    out.core_fraction_hits)
        if out.hit_calibration_showers < 0:
            raise OptionError(f"hit_calibration_showers must be >= 0, got "
                              f"{out.hit_calibration_showers}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_config() -> ICaloFlowConfig:
    """Sized for 2 CPU cores: 60 minutes, Flow-3 on 11 random layers of each shower
    (64 showers x 11 layers ~ 700 layers per step, the published batch of ~1000 layers;
    measured 120 showers/s on calochallenge-2 against 33 with every layer), epochs of
    20,000 showers (a pass over 100,000 showers takes ~16 minutes on 2 cores)."""
    return ICaloFlowConfig(layers_per_shower=11, training=TrainingConfig(
        epochs=1000, batch_size=64, learning_rate=1e-3, val_fraction=0.02,
        epoch_showers=20_000, time_budget_s=60 * 60))


def _paper_config() -> ICaloFlowConfig:
    """The published sizes (8 MADE-RQS blocks of 256 hidden units, batch ~1000 layers)."""
    return ICaloFlowConfig(
        flow1=FlowConfig(blocks=8, hidden=[256, 256]),
        flow2=FlowConfig(blocks=8, hidden=[256]),
        flow3=FlowConfig(blocks=8, hidden=[256]),
        training=TrainingConfig(epochs=100, batch_size=32, learning_rate=1e-3))


def _tiny_config() -> ICaloFlowConfig:
    """For tests: seconds on a CPU."""
    return ICaloFlowConfig(flow1=FlowConfig(blocks=2, hidden=[16]),
                           flow2=FlowConfig(blocks=2, hidden=[32], passes=4),
                           flow3=FlowConfig(blocks=2, hidden=[32], passes=4),
                           training=TrainingConfig(epochs=2, batch_size=32))


PRESETS: dict[str, Callable[[], Any]] = {"cpu": _cpu_config, "paper": _paper_config,
                                       "tiny": _tiny_config}


class ICaloFlowModule(torch.nn.Module):
    """Flow-1, Flow-2 and the shared Flow-3; ``student=True``: Flow-2 and Flow-3 are the
    inverse-autoregressive twins (one pass per block when sampling)."""

    def __init__(self, n_context: int, n_layers: int, layer_size: int, config: ICaloFlowConfig,
                 student: bool = False) -> None:
        super().__init__()
        self.flow1 = build_maf(n_layers, n_context, config.flow1)
        self.flow2 = build_maf(layer_size, n_context + 1, config.flow2,
                               layer_orders([layer_size], config.flow2.blocks, seed=0),
                               inverse=student)
        # context: conditions, log E_n, log E_{n-1}, layer n-1, one-hot n (1 .. L-1)
        self.flow3 = build_maf(layer_size, n_context + 2 + layer_size + n_layers - 1,
                               config.flow3,
                               layer_orders([layer_size], config.flow3.blocks, seed=1),
                               inverse=student)


class ICaloFlow(LayerEnergyFlows):
    """The iCaloFlow teacher (three MAFs) on geometries whose layers have equal cell counts.

    Example::

        model = ICaloFlow(get_geometry("calochallenge-2"), ICaloFlow.preset("cpu"))
        model.fit(ShowerStream("dataset_2_train.h5", geometry), "runs/icf")
        generated = model.sample(reference.incident_energies, seed=1)
    """

    family = "icaloflow"
    config_class = ICaloFlowConfig
    streams_training_data = True
    # Noise a thirtieth of the cut, not the published third: with a third, 21 % of the
    # teacher's calochallenge-2 hits lay between the 15 keV cut and 100 keV (reference
    # 0.6 %), leaked from the noise band of empty cells; a thirtieth gave 11 % and AUC
    # high 0.960 instead of 0.988; a thousandth 8 % but a student 5x further from its
    # teacher and both AUCs worse (README).
    noise_per_threshold = 1 / 30
    log_prob_batch_size = 256
    sampling_memory_bytes = 1e9

    def __init__(self, geometry: Geometry, config: ICaloFlowConfig | None = None) -> None:
        sizes = set(geometry.layer_sizes)
        if len(sizes) != 1 or geometry.n_layers < 2:
            raise GeometryError(
                f"iCaloFlow needs at least two layers with the same number of cells; "
                f"{geometry.name!r} has layer sizes {sorted(sizes)}")
        config = config or _cpu_config()
        threshold, noise = threshold_and_noise(config, geometry, self.noise_per_threshold)
        self.layer_size = geometry.layer_sizes[0]
        super().__init__(geometry, config, VoxelTransform([self.layer_size], noise, threshold,
                                                          config.logit_alpha))
        self.previous_mean, self.previous_std = 0.0, 1.0
        self.hit_cuts_mev: list[float] | None = None  # see calibrate_hits
        self.postprocess_nodes: list[list[float]] | None = None  # see fit_postprocess
        self.core_fraction_maps: list[CoreFractionMap] | None = None  # see fit_core_fraction
        self.hit_count_model: HitCountModel | None = None  # see fit_hit_counts

    PRESETS = PRESETS

    # --- preprocessing ----------------------------------------------------------------
    def _layers(self, voxels: torch.Tensor) -> torch.Tensor:
        """``(B, n_voxels)`` -> ``(B, L, S)`` (the geometry stores layers consecutively)."""
        return voxels.reshape(len(voxels), self.geometry.n_layers, self.layer_size)

    def _fit_preprocessing(self, data: ShowerData) -> None:
        self._fit_threshold(data)
        super()._fit_preprocessing(data)
        # ~20M voxel values suffice for two scalars (float64 copies of a large sample
        # would dominate the memory of streamed training on 40,500-voxel showers)
        rows = max(1, min(2000, 20_000_000 // self.geometry.n_voxels))
        sample = torch.as_tensor(data.showers[:rows], dtype=torch.float64)
        x = self._normalised_layers(sample, torch.Generator().manual_seed(0))[1]
        self.previous_mean = float(x.mean())
        self.previous_std = max(float(x.std()), 1e-3)

    def _normalised_layers(self, voxels: torch.Tensor, generator: torch.Generator | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer energies ``(B, L)`` MeV of the noisy showers and their normalised layers
        in logit space ``(B, L, S)``."""
        noisy = self._layers(self.voxel_transform.add_noise(voxels, generator))
        energies = noisy.sum(-1)
        shares = noisy / energies[..., None].clamp(min=torch.finfo(noisy.dtype).tiny)
        return energies, LogitTransform(self.voxel_transform.alpha).forward(shares)

    def _flow3_context(self, context: torch.Tensor, log_energy: torch.Tensor,
                       log_previous_energy: torch.Tensor, previous: torch.Tensor,
                       layer: torch.Tensor) -> torch.Tensor:
        """Flow-3 context ``(P, C + 2 + S + L - 1)`` of P (shower, layer n) pairs: conditions
        ``(P, C)``, standardised log E_n and log E_{n-1} ``(P,)``, layer n-1 in logit space
        ``(P, S)`` and n ``(P,)`` (1 .. L-1)."""
        one_hot = torch.nn.functional.one_hot(layer - 1, self.geometry.n_layers - 1)
        return torch.cat([context, log_energy[:, None], log_previous_energy[:, None],
                          (previous - self.previous_mean) / self.previous_std,
                          one_hot.to(context.dtype)], dim=1)

    # --- likelihood -------------------------------------------------------------------
    def _flow_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
                     layers_per_shower: int = 0
                     ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
        """Flow name -> (input, context) for a batch, with fresh dequantisation noise, and
        the weight of the Flow-3 term (L - 1 over the layers used per shower).

        Flow-1: ``(B, L)``; Flow-2: ``(B, S)``; Flow-3: ``(B * k, S)`` pairs (k layers per
        shower, every layer 1 .. L-1 unless ``layers_per_shower``)."""
        context = self._context(batch)
        energies, x = self._normalised_layers(batch["voxels"], generator)
        log_energies = self._layer_context(energies)
        n_showers, n_layers = energies.shape
        later = n_layers - 1
        if 0 < layers_per_shower < later:
            scores = torch.rand(n_showers, later, generator=generator).to(x.device)
            layer = scores.argsort(dim=1)[:, :layers_per_shower] + 1
        else:
            layer = torch.arange(1, n_layers, device=x.device).expand(n_showers, later)
        k = layer.shape[1]
        shower = torch.arange(n_showers, device=x.device)[:, None].expand(-1, k)
        layer, shower = layer.reshape(-1), shower.reshape(-1)
        context3 = self._flow3_context(context[shower], log_energies[shower, layer],
                                       log_energies[shower, layer - 1], x[shower, layer - 1],
                                       layer)
        return {"flow1": (self.layer_transform.forward(energies, batch["incident_energy"]),
                          context),
                "flow2": (x[:, 0], torch.cat([context, log_energies[:, :1]], dim=1)),
                "flow3": (x[shower, layer], context3)}, later / k

    def _log_prob(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
                  layers_per_shower: int = 0) -> torch.Tensor:
        """Joint log-likelihood ``(B,)`` per shower in the flows' space (nats)."""
        assert self.module is not None
        inputs, weight = self._flow_inputs(batch, generator, layers_per_shower)
        n_showers = len(batch["incident_energy"])
        log_p = self.module.flow1(inputs["flow1"][1]).log_prob(inputs["flow1"][0])
        log_p = log_p + self.module.flow2(inputs["flow2"][1]).log_prob(inputs["flow2"][0])
        per_layer = self.module.flow3(inputs["flow3"][1]).log_prob(inputs["flow3"][0])
        return log_p + weight * per_layer.reshape(n_showers, -1).sum(1)

    def _distillation_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                             every_layer: bool = False
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        layers = 0 if every_layer else self.config.layers_per_shower
        return self._flow_inputs(batch, generator, layers)[0]

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Mean negative joint log-likelihood per shower (nats, in the flows' space)."""
        return -self._log_prob(batch, generator, self.config.layers_per_shower).mean()

    def validation_batch_size(self, training_batch_size: int) -> int:
        """Validation runs every layer of a shower: showers per batch as in training (the
        Trainer's default of 1024 would hold 45,000 layers of activations at once)."""
        return training_batch_size

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                        ) -> torch.Tensor:
        """The same, over every layer (no layer subsampling)."""
        return -self._log_prob(batch, generator).mean()

    def _new_module(self) -> ICaloFlowModule:
        return ICaloFlowModule(self.conditions.n_features, self.geometry.n_layers,
                               self.layer_size, self.config, student=self.inverse_autoregressive)

    # --- hit/no-hit calibration --------------------------------------------------------
    def end_fit(self, data: ShowerData | ShowerStream, run_dir: str) -> None:
        """Calibrate the hit cuts, fit the hit count model, then the spectrum map, then the
        core fraction map, on the first training showers (each where configured)."""
        config = self.config
        later = config.postprocess == "spline" or config.core_fraction != "none"
        counts = config.hit_counts != "none"
        reference = first_showers(data, max(config.hit_calibration_showers,
                                            config.postprocess_showers if later else 0,
                                            config.hit_count_showers if counts else 0))
        if config.hit_calibration_showers:
            self.calibrate_hits(reference.select(slice(0, config.hit_calibration_showers)))
        if counts:
            self.fit_hit_counts(reference.select(slice(0, config.hit_count_showers)))
        if config.postprocess == "spline":
            self.fit_postprocess(reference.select(slice(0, config.postprocess_showers)))
        if config.core_fraction != "none":
            self.fit_core_fraction(reference.select(slice(0, config.postprocess_showers)))

    def calibrate_hits(self, reference: ShowerData, seed: int = 3) -> None:
        """Set a cut per layer (MeV, >= the readout threshold) so that the model, sampling
        ``reference``'s conditions, makes no more hits per layer than ``reference`` has.

        Why: the flows put empty voxels (dequantisation noise, far below the threshold)
        and the faintest real deposits a few logit units apart, and sampling puts too much
        mass between them: voxels just above the threshold, too many in sparse layers
        (docs/icaloflow.md). The cut removes the faintest generated voxels of a layer
        until its hit count is the data's; the layer keeps its energy above the readout
        threshold (:meth:`~caloforge.preprocessing.VoxelTransform.cut_voxels`)."""
        self.hit_cuts_mev = self.postprocess_nodes = self.core_fraction_maps = None
        self.hit_count_model = None
        generated = self._sample_like(reference, seed)
        self.hit_cuts_mev = occupancy_cuts(reference.showers, generated,
                                           list(self.geometry.layer_sizes),
                                           self.voxel_transform.threshold_mev)

    def fit_hit_counts(self, reference: ShowerData) -> None:
        """Fit the hit count model (``hit_counts``) on ``reference``'s hits per layer (or
        radial band), layer deposits and E_inc (data alone); clears the spectrum and core
        fraction maps, fitted on the showers it changes."""
        self.postprocess_nodes = self.core_fraction_maps = None
        self.hit_count_model = fit_layer_counts(
            reference.showers.reshape(len(reference), self.geometry.n_layers, -1),
            reference.incident_energies, self._count_bands(),
            self.voxel_transform.threshold_mev)

    def _count_bands(self) -> np.ndarray:
        """Each voxel's count group within a layer ``(S,)``
        (:func:`~caloforge.hit_counts.count_bands`)."""
        return count_bands(self.geometry, self.config.hit_counts)

    @property
    def n_hit_counts(self) -> int:
        """The counts drawn per shower (``hit_counts``): layers x bands, or 0."""
        if self.config.hit_counts == "none":
            return 0
        return self.geometry.n_layers * (int(self._count_bands().max()) + 1)

    def _hit_counts(self, incident_energies: torch.Tensor, layer_energies: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor | None:
        """Each shower's hits per layer (and band) ``(B, L x n_bands)`` drawn from ``noise``
        of that shape given E_inc ``(B,)`` MeV and the Flow-1 energies ``(B, L)`` MeV; None
        without a fitted count model."""
        if self.hit_count_model is None or self.config.hit_counts == "none":
            return None
        return self.hit_count_model.draw(incident_energies.to(layer_energies.dtype),
                                         layer_energies, noise.to(layer_energies.dtype),
                                         max_count=float(self.layer_size))

    def fit_postprocess(self, reference: ShowerData, seed: int = 4) -> None:
        """Fit the monotone map (PCHIP in log10 MeV through 128 quantiles) from the voxels
        this model generates for ``reference``'s conditions (hit cuts applied) to
        ``reference``'s own voxels above threshold. At generation each layer is mapped
        through it, then scaled back to its Flow-1 energy."""
        self.postprocess_nodes = self.core_fraction_maps = None
        self.postprocess_nodes = quantile_map_nodes(reference.showers,
                                                    self._sample_like(reference, seed))

    def fit_core_fraction(self, reference: ShowerData, seed: int = 5) -> None:
        """Fit the per-layer core fraction map(s) (``core_fraction``) from this model's
        showers for ``reference``'s conditions (hit cuts or counts and spectrum map applied)
        to ``reference``'s (:func:`~caloforge.core_fraction.fit_core_fraction_maps`)."""
        self.core_fraction_maps = None
        shape = (self.geometry.n_layers, self.layer_size)
        self.core_fraction_maps = fit_option_maps(
            self.geometry, self.config.core_fraction, self.config.core_fraction_radius,
            reference.showers.reshape(len(reference), *shape), reference.incident_energies,
            self._sample_like(reference, seed).reshape(len(reference), *shape),
            reference.incident_energies, self.voxel_transform.threshold_mev,
            hit_regressors=self.config.core_fraction_hits)[0]

    def _sample_like(self, reference: ShowerData, seed: int) -> np.ndarray:
        """Showers ``(N, n_voxels)`` for ``reference``'s conditions, on the module's device."""
        device = next(self.module.parameters()).device.type
        return self.sample(reference.incident_energies, reference.conditions, seed=seed,
                           device=device).showers

    def _generated_layer(self, x: torch.Tensor, layer: int, layer_energies: torch.Tensor,
                         incident_energies: torch.Tensor, cut: torch.Tensor | None,
                         counts: torch.Tensor | None = None) -> torch.Tensor:
        """Voxels ``(B, S)`` MeV of layer ``layer`` from its flow output ``x`` ``(B, S)``,
        the Flow-1 energies ``(B, L)`` MeV and E_inc ``(B,)`` MeV: renormalised to its
        energy, cut (or, given every layer's hit ``counts`` ``(B, L x n_bands)``, that many
        voxels kept per band), mapped through the spectrum spline and scaled back to the
        layer energy, its core fraction mapped (each where fitted)."""
        layer_energy = layer_energies[:, layer:layer + 1]
        if counts is None:
            voxels = self.voxel_transform.inverse(x, layer_energy, cut)
        else:
            n_bands = counts.shape[1] // self.geometry.n_layers
            threshold = self.voxel_transform.threshold_mev
            raw = self.voxel_transform.inverse(x, layer_energy, keep_below=True)
            voxels = counted_cells(raw, torch.full_like(raw[0], threshold),
                                   counts[:, layer * n_bands:(layer + 1) * n_bands],
                                   self._count_bands(), threshold)
        if self.postprocess_nodes is not None:
            mapped = monotone_log_map(voxels, *self.postprocess_nodes)
            sums = mapped.sum(-1, keepdim=True)
            scale = torch.where(sums > 0,
                                layer_energy / sums.clamp(min=torch.finfo(x.dtype).tiny),
                                torch.zeros_like(sums))
            voxels = mapped * scale
        voxels = apply_core_fraction_maps(self.core_fraction_maps or [], voxels, layer,
                                          incident_energies, layer_energies)
        return voxels

    def _layer_cuts(self, device: torch.device | str) -> torch.Tensor | None:
        """The calibrated cuts ``(L,)`` MeV, or None (threshold only)."""
        if self.hit_cuts_mev is None:
            return None
        return torch.tensor(self.hit_cuts_mev, dtype=torch.float32, device=device)

    # --- sampling ---------------------------------------------------------------------
    @property
    def voxels_per_pass(self) -> int:
        return self.layer_size

    def sample_layer_energies(self, incident_energies: np.ndarray,
                              conditions: dict[str, np.ndarray] | None = None, seed: int = 0,
                              shard: int = 0, batch_size: int = 10_000, device: str = "cpu"
                              ) -> np.ndarray:
        """The Flow-1 layer energies ``(N, L)`` MeV that :meth:`sample` draws for the same
        arguments (its showers' layers sum to these, less the voxels cut at threshold)."""
        energies, conditions = self._sampling_inputs(incident_energies, conditions)
        with torch.inference_mode():
            spans, contexts = self._sampling_contexts(energies, conditions, batch_size, device)
            layer_energies = self._sample_flow1(spans, contexts, energies,
                                                shard_generator(seed, shard), device)
        return layer_energies.cpu().numpy()

    def sample(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray] | None = None,
               seed: int = 0, shard: int = 0, batch_size: int = 10_000, device: str = "cpu",
               ) -> ShowerData:
        energies, conditions = self._sampling_inputs(incident_energies, conditions)
        n, n_layers, size = len(energies), self.geometry.n_layers, self.layer_size
        out = np.empty((n, n_layers * size), dtype=np.float32)
        with torch.inference_mode():
            spans, contexts, generator, layer_energies, log_energies = \
                self._start_layer_sampling(energies, conditions, seed, shard, batch_size, device)
            module = self.module
            cuts = self._layer_cuts(device)
            incident = torch.as_tensor(energies, dtype=layer_energies.dtype, device=device)
            # drawn whether or not the count model is fitted yet: the same noise follows
            count_noise = torch.randn(n, self.n_hit_counts, generator=generator).to(device)
            counts = self._hit_counts(incident, layer_energies, count_noise)
            previous = torch.empty(n, size, device=device)
            for layer in range(n_layers):
                # one draw per layer for the whole shard: independent of the batch size
                z = torch.randn(n, size, generator=generator)
                for (a, b), context in zip(spans, contexts):
                    if layer == 0:
                        flow, flow_context = module.flow2, torch.cat(
                            [context, log_energies[a:b, :1]], dim=1)
                    else:
                        index = torch.full((b - a,), layer, device=device)
                        flow, flow_context = module.flow3, self._flow3_context(
                            context, log_energies[a:b, layer], log_energies[a:b, layer - 1],
                            previous[a:b], index)
                    x = finite_logits(flow_inverse(flow, flow_context, z[a:b].to(device)))
                    voxels = self._generated_layer(
                        x, layer, layer_energies[a:b], incident[a:b],
                        None if cuts is None else cuts[layer:layer + 1],
                        None if counts is None else counts[a:b])
                    out[a:b, layer * size:(layer + 1) * size] = voxels.cpu().numpy()
                    previous[a:b] = x
        return self._sampled_data(energies, out, conditions)

    # --- sampling from given noise (the exported graph) --------------------------------
    # `sample` above keeps its layer-major loop (one layer of the whole shard at a time:
    # the noise of a calochallenge-3 shard at once would not fit in memory); these give the
    # same showers for the same draws, shower by shower, for `caloforge export`.
    def noise_features(self) -> int:
        return self.geometry.n_layers * (1 + self.layer_size) + self.n_hit_counts

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Flow-1's noise ``(n, L)``, the hit counts' ``(n, L x n_bands)`` (``hit_counts``),
        then each layer's ``(n, S)`` in order: the draws :meth:`sample` makes."""
        draws = [torch.randn(n, self.geometry.n_layers, generator=generator),
                 torch.randn(n, self.n_hit_counts, generator=generator)]
        draws += [torch.randn(n, self.layer_size, generator=generator)
                  for _ in range(self.geometry.n_layers)]
        return torch.cat(draws, dim=1)

    layer_steps = True

    def _layer_step_state(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The previous layer in logit space ``(B, S)`` (zeros before layer 0, which does
        not read it)."""
        return {"previous": torch.zeros_like(noise[:, :self.layer_size])}

    def _layer_noise_step(self, step: int, noise: torch.Tensor,
                          state: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``step``'s voxels ``(B, S)`` MeV from its noise and the layer before it."""
        assert self.module is not None
        n_layers, size, n_counts = self.geometry.n_layers, self.layer_size, self.n_hit_counts
        start = n_layers + n_counts + step * size
        z = noise[:, start:start + size]
        context, log_energies = state["context"], state["log_energies"]
        if step == 0:
            flow, flow_context = self.module.flow2, torch.cat(
                [context, log_energies[:, :1]], dim=1)
        else:
            index = torch.zeros_like(log_energies[:, 0], dtype=torch.long) + step
            flow, flow_context = self.module.flow3, self._flow3_context(
                context, log_energies[:, step], log_energies[:, step - 1], state["previous"],
                index)
        previous = finite_logits(flow_inverse(flow, flow_context, z))
        cuts = self._layer_cuts(noise.device)
        # every step draws the counts again from the same noise: the steps share no state
        counts = self._hit_counts(state["incident_energy"], state["layer_energies"],
                                  noise[:, n_layers:n_layers + n_counts])
        voxels = self._generated_layer(previous, step, state["layer_energies"],
                                       state["incident_energy"],
                                       None if cuts is None else cuts[step:step + 1], counts)
        return voxels, {"previous": previous}

    # --- persistence ------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {**super().to_json_state(), "previous_mean": self.previous_mean,
                "previous_std": self.previous_std, "hit_cuts_mev": self.hit_cuts_mev,
                "postprocess_nodes": self.postprocess_nodes,
                "core_fraction_maps": None if self.core_fraction_maps is None
                else [fraction_map.state() for fraction_map in self.core_fraction_maps],
                "hit_count_model": None if self.hit_count_model is None
                else self.hit_count_model.state()}

    def _restore_extra_state(self, state: dict[str, Any]) -> None:
        self.previous_mean = float(state["previous_mean"])
        self.previous_std = float(state["previous_std"])
        cuts = state.get("hit_cuts_mev")  # models saved before the calibration: None
        self.hit_cuts_mev = None if cuts is None else [float(c) for c in cuts]
        nodes = state.get("postprocess_nodes")
        self.postprocess_nodes = None if nodes is None else [list(map(float, v)) for v in nodes]
        self.core_fraction_maps = core_fraction_maps_from_state(state)
        counts = state.get("hit_count_model")  # saved before hit_counts: absent
        self.hit_count_model = None if counts is None else HitCountModel.from_state(counts)


def _cpu_student() -> DistillationConfig:
    """The distillation preset with the teacher's batches and epochs of 20,000 showers (a
    pass over a large set would otherwise be one epoch of ~30 minutes)."""
    config = DISTILLATION_PRESETS["cpu"]()
    config.training.batch_size = 64
    config.training.val_fraction = 0.02
    config.training.epoch_showers = 20_000
    return config


STUDENT_PRESETS = {**DISTILLATION_PRESETS, "cpu": _cpu_student}


class ICaloFlowStudent(DistilledStudent, ICaloFlow):
    """An iCaloFlow whose Flow-2 and Flow-3 are IAFs distilled from a teacher (one network
    pass per block and layer when sampling); Flow-1 is the teacher's."""

    family = "icaloflow-student"
    teacher_family = "icaloflow"
    distilled_flows = ("flow2", "flow3")

    PRESETS = STUDENT_PRESETS



__all__ = ["ICaloFlow", "ICaloFlowConfig", "ICaloFlowStudent", "PRESETS"]
