"""What the layer-by-layer flow families share (:class:`LayerEnergyFlows`): a flow for the
layer energies given the context and voxel flows conditioned on standardised log layer
energies, with their fitted preprocessing, threshold and noise resolution, and batched
sampling within a memory budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...data import ShowerData, ShowerStream, iter_first_showers
from ...features import apply_threshold
from ...geometry import Geometry
from ...layer_hits import LayerHitMap
from ...preprocessing import ConditionTransform, LayerEnergyTransform, VoxelTransform
from ..base import ConditionedModel, shard_generator
from .toolkit import flow_inverse

# a NaN from a spline inverse (an input far outside the flow's range) becomes a logit far
# below any threshold: an empty voxel instead of a poisoned shower
EMPTY_LOGIT = -20.0


def finite_logits(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN replaced by :data:`EMPTY_LOGIT`."""
    return torch.nan_to_num(x, nan=EMPTY_LOGIT)


def threshold_and_noise(config: Any, geometry: Geometry, noise_per_threshold: float
                        ) -> tuple[float, float]:
    """(threshold, dequantisation noise) in MeV: the config's where set; else the
    geometry's readout threshold (0.01 MeV where it has none, until ``_fit_threshold`` sees
    the training data) and ``noise_per_threshold`` times it."""
    threshold = config.threshold_mev
    if threshold is None:
        threshold = geometry.threshold_mev if geometry.threshold_mev > 0 else 0.01
    noise = config.noise_mev if config.noise_mev is not None \
        else threshold * noise_per_threshold
    return threshold, noise


class LayerEnergyFlows(ConditionedModel):
    """What CaloFlow, iCaloFlow and the convolutional flows share: a flow for the layer
    energies given the context (Flow I / Flow-1) and voxel flows conditioned on
    standardised log layer energies.

    Fitted preprocessing (saved with the model): the context (:class:`ConditionTransform`),
    the layer-energy u-space (:class:`LayerEnergyTransform`), the voxel transform and the
    mean/std of log10 of each layer's energy. Subclasses set ``config_class`` and provide
    ``_new_module()`` and ``_log_prob(batch, generator)`` ``(B,)``.
    """

    config_class: Any
    voxel_transform_class: Any = VoxelTransform
    has_likelihood = True
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
                 voxel_transform: Any) -> None:
        super().__init__(geometry)
        self.config = config
        self.conditions = ConditionTransform()
        self.layer_transform = LayerEnergyTransform(geometry.n_layers, alpha=config.logit_alpha)
        self.voxel_transform = voxel_transform
        self.layer_log_mean = [0.0] * geometry.n_layers
        self.layer_log_std = [1.0] * geometry.n_layers
        self.module: Any = None
        # which layers have a hit at all, calibrated after training (layer_hits.py)
        self.layer_hit_map: LayerHitMap | None = None

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
        noisy = self._flow_training_layer_energies(data)
        self.layer_transform.fit(noisy, data.incident_energies)
        log_layers = np.log10(noisy)
        self.layer_log_mean = log_layers.mean(0).tolist()
        self.layer_log_std = np.maximum(log_layers.std(0), 1e-3).tolist()

    def _flow_training_layer_energies(self, data: ShowerData) -> np.ndarray:
        """``(N, L)`` MeV: the layer energies the energy flow learns, each with its expected
        dequantisation (what the u-space transform is fitted on)."""
        layer_energies = self.geometry.layer_energies(data.showers, dtype=np.float64)
        return layer_energies + self._expected_layer_offset_mev()

    def fit_layer_energy_range(self, data: ShowerData) -> None:
        """Fit the range the energy flow's draws are clamped into
        (:meth:`~caloforge.preprocessing.LayerEnergyTransform.fit_range`) on training
        showers ``data``, the rest of the model unchanged: for runs saved before it."""
        self.layer_transform.fit_range(self._flow_training_layer_energies(data),
                                       data.incident_energies)

    def _expected_layer_offset_mev(self) -> np.ndarray:
        """``(L,)`` MeV: what the layer energies the flows learn hold on average beyond the
        deposit (here: the dequantisation noise of every cell)."""
        return 0.5 * self.voxel_transform.noise_mev * np.asarray(self.geometry.layer_sizes)

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
        return self._hits_calibrated(torch.cat([
            self.layer_transform.inverse(flow_inverse(module.flow1, context, z1[a:b].to(device)),
                                         e_inc[a:b])
            for (a, b), context in zip(spans, contexts)]), e_inc)

    def _hits_calibrated(self, layer_energies: torch.Tensor, incident_energies: torch.Tensor
                         ) -> torch.Tensor:
        """The energy flow's layer energies ``(B, L)`` MeV for E_inc ``(B,)`` MeV through the
        fitted :class:`~caloforge.layer_hits.LayerHitMap` (unchanged without one)."""
        if self.layer_hit_map is None:
            return layer_energies
        return self.layer_hit_map.apply(layer_energies, incident_energies)

    def fit_layer_hits(self, reference: ShowerData | ShowerStream, n_showers: int,
                       empty_mev: float, seed: int = 5) -> None:
        """Fit the :class:`~caloforge.layer_hits.LayerHitMap` from the energy flow's draws
        for the conditions of ``reference``'s first ``n_showers`` to their layer deposits
        (the cells at or above the readout threshold); ``empty_mev``: what an emptied layer's
        deposit becomes (under any hit). The showers are read a thousand at a time: only
        their layer sums are kept (20,000 calochallenge-3 showers are 3.2 GB)."""
        self.layer_hit_map = None
        threshold = self.voxel_transform.threshold_mev
        deposits, conditions = [], []
        for piece in iter_first_showers(reference, n_showers):
            deposits.append(self.geometry.layer_energies(apply_threshold(piece.showers, threshold),
                                                         dtype=np.float64))
            conditions.append(ShowerData(piece.incident_energies,
                                         np.zeros((len(piece), 0), np.float32),
                                         piece.conditions, piece.condition_units))
        light = ShowerData.concatenate(conditions)
        with torch.inference_mode():
            drawn = self._start_layer_sampling(light.incident_energies, light.conditions, seed,
                                               0, 10_000, "cpu")[3]
        self.layer_hit_map = LayerHitMap.fit(np.concatenate(deposits), light.incident_energies,
                                             drawn.double().numpy(), light.incident_energies,
                                             threshold, empty_mev)

    # --- sampling from noise in steps: what `caloforge export` exports graph by graph ---
    # A family that draws its layers from noise one after the other (iCaloFlow, convflow)
    # sets ``layer_steps`` and provides ``_layer_step_state`` and ``_layer_noise_step``.
    # The energy flow is then inverted one block per step: a fully autoregressive MAF's
    # inverse is one network pass per feature, and the ONNX exporter's time grows about
    # quadratically with a graph's size (45 layer energies x 6 blocks as one graph took
    # 24 minutes to export; docs/export.md).
    layer_steps = False

    @property
    def noise_steps(self) -> int:  # type: ignore[override]
        return self._energy_blocks() + self.geometry.n_layers if self.layer_steps else 0

    def _energy_blocks(self) -> int:
        assert self.module is not None
        return len(self.module.flow1.transform.transforms)

    def noise_prologue(self, noise: torch.Tensor, batch: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """The context ``(B, C)``, the incident energy ``(B,)`` MeV, the energy flow's base
        noise ``(B, L)`` (inverted block by block in the first steps), placeholders for the
        layer energies ``(B, L)`` MeV and their standardised logs ``(B, L)`` (set by the
        last energy step), and the family's layer state."""
        n_layers = self.geometry.n_layers
        placeholder = torch.zeros_like(noise[:, :n_layers])
        return {"context": self._context(batch), "incident_energy": batch["incident_energy"],
                "energy_flow": noise[:, :n_layers], "layer_energies": placeholder,
                "log_energies": placeholder, **self._layer_step_state(noise)}

    def noise_step(self, step: int, noise: torch.Tensor, state: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Steps ``0 .. blocks - 1`` invert the energy flow's blocks, last first (no cells:
        ``(B, 0)``; the last one sets the layer energies); then layer ``step - blocks``'s
        cells ``(B, n_layer_voxels)`` MeV."""
        assert self.module is not None
        blocks = self._energy_blocks()
        if step >= blocks:
            return self._layer_noise_step(step - blocks, noise, state)
        block = self.module.flow1.transform.transforms[blocks - 1 - step]
        inverted = block(state["context"]).inv(state["energy_flow"])
        no_cells = noise[:, :0]
        if step < blocks - 1:
            return no_cells, {"energy_flow": inverted}
        layer_energies = self._hits_calibrated(
            self.layer_transform.inverse(inverted, state["incident_energy"]),
            state["incident_energy"])
        return no_cells, {"energy_flow": inverted, "layer_energies": layer_energies,
                          "log_energies": self._layer_context(layer_energies)}

    def _layer_step_state(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state entries ``(B, ...)`` the first layer step reads besides the energies."""
        raise NotImplementedError

    def _layer_noise_step(self, layer: int, noise: torch.Tensor,
                          state: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``layer``'s cells ``(B, n_layer_voxels)`` MeV and the state it changes."""
        raise NotImplementedError

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
                "layer_log_mean": self.layer_log_mean, "layer_log_std": self.layer_log_std,
                "layer_hit_map": None if self.layer_hit_map is None
                else self.layer_hit_map.state()}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry) -> Any:
        family: Any = cls  # every family's constructor takes (geometry, config)
        model = family(geometry, cls.config_class.from_dict(state["config"]))
        model.conditions = ConditionTransform.from_state(state["conditions"])
        model.layer_transform = LayerEnergyTransform.from_state(state["layer_transform"])
        model.voxel_transform = cls.voxel_transform_class.from_state(state["voxel_transform"])
        model.layer_log_mean = list(state["layer_log_mean"])
        model.layer_log_std = list(state["layer_log_std"])
        hit_map = state.get("layer_hit_map")  # saved before the map: absent
        model.layer_hit_map = None if hit_map is None else LayerHitMap.from_state(hit_map)
        model._restore_extra_state(state)
        model.module = model._new_module()
        return model

    def _restore_extra_state(self, state: dict[str, Any]) -> None:
        """Fitted state a subclass adds to ``to_json_state``."""
