"""What the GAN families share: configuration, players and losses, physics features for the
critic, validation by separation power, per-epoch diagnostics and batched sampling.

A family (:mod:`~caloforge.models.gans.calogan`, :mod:`~caloforge.models.gans.wgan`) provides the
voxel representation the networks work in (``_fit_representation``, ``_encode``,
``_decode``) and the two networks (``_new_module`` returning a :class:`GanModule`). The
shared :class:`~caloforge.training.Trainer` runs the game: the critic updates on every
batch, the generator on every ``n_critic``-th, each with its own Adam optimiser.

GANs have no likelihood, so the epoch is selected by a **validation metric**: the mean
separation power (CaloChallenge definition, 50 bins from the reference's range) of the
high-level features (energies, sparsity, centres and widths per layer, E_tot/E_inc)
between the held-out validation showers and as many generated with the same conditions.
0 means identical histograms, 1 disjoint ones.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ShowerData
from ...errors import OptionError
from ...features import apply_threshold, feature_bins, high_level_features, separation_power
from ...geometry import CartesianLayer, Geometry
from ...preprocessing import ConditionTransform
from ...training import Player, TrainingConfig, config_from_dict
from ..base import ConditionedModel

VALIDATION_SEED = 20_221


@dataclass
class GanConfig:
    """Sizes and the adversarial recipe. ``training.learning_rate`` is the generator's rate;
    the critic's is ``critic_lr_factor`` times it."""

    latent_dim: int = 64
    generator_width: int = 32
    critic_width: int = 32
    loss: str = "wgan-gp"  # or "bce" (non-saturating, the original CaloGAN)
    n_critic: int = 5
    critic_lr_factor: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    gp_weight: float = 10.0
    drift_weight: float = 1e-3  # keeps the critic's output near 0 (WGAN-GP only)
    minibatch_features: int = 0  # minibatch-discrimination kernels in the critic (0: none)
    critic_features: bool = True  # the critic also sees ShowerFeatures of the decoded shower
    validation_showers: int = 10_000
    diagnostics: bool = True
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        learning_rate=1e-4, weight_decay=0.0, schedule="constant", grad_clip=100.0))

    def validate(self) -> None:
        if self.loss not in ("wgan-gp", "bce"):
            raise OptionError(f"GAN loss must be wgan-gp or bce, got {self.loss!r}")
        if self.n_critic < 1 or self.latent_dim < 1 or self.generator_width < 1 \
                or self.critic_width < 1:
            raise OptionError("n_critic, latent_dim and the widths must be >= 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise OptionError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.critic_lr_factor <= 0 or self.validation_showers < 100:
            raise OptionError("critic_lr_factor must be > 0 and validation_showers >= 100")
        self.training.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GanConfig:
        config: GanConfig = config_from_dict(cls, values, "GAN")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GanModule(torch.nn.Module):
    # A generator also has ``start_from_mean(mean_representation)``: it is initialised to
    # output about the training showers' mean, so that training starts from showers of
    # the right scale and shape instead of noise (much faster on a CPU budget).

    """``generator(z (B, latent), context (B, c), incident_energy (B,) MeV) ->
    representation`` and ``critic(representation, voxels (B, n_voxels) MeV, context,
    incident_energy) -> (B,)`` scores."""

    generator: Any  # a torch.nn.Module with start_from_mean
    critic: torch.nn.Module

    def __init__(self, generator: torch.nn.Module, critic: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator
        self.critic = critic


class MinibatchDiscrimination(torch.nn.Module):
    """Salimans et al. (2016): for each shower, how close its projected features are to
    the rest of the batch's, ``(B, in) -> (B, kernels)``; lets the critic see mode collapse."""

    def __init__(self, in_features: int, kernels: int, kernel_dim: int = 8) -> None:
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        self.projection = torch.nn.Linear(in_features, kernels * kernel_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        m = self.projection(features).view(-1, self.kernels, self.kernel_dim)
        distance = (m[:, None] - m[None]).abs().sum(-1)  # (B, B, kernels)
        return torch.exp(-distance).sum(1) - 1.0  # without the shower itself


class ShowerFeatures(torch.nn.Module):
    """Differentiable physics summaries of showers for a critic, ``(B, n_voxels) MeV -> (B, d)``.

    Per layer: log10 of the layer's share of E_inc (floored at 1e-4), the sparsity (fraction
    of empty cells, no gradient), and for Cartesian layers the centre of energy and width in
    x and y in units of the layer's half-extent (energy-weighted with a floor of 1e-3 E_inc, so that
    nearly empty layers do not give the critic huge gradients: the gradient penalty is
    taken between real and generated showers, where layers may be nearly empty); then
    log10(E_tot / E_inc) and the energy balance |E_tot - E_inc| / E_inc.
    """

    layer_index: torch.Tensor  # buffers
    coordinates: torch.Tensor

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        index = np.repeat(np.arange(geometry.n_layers), geometry.layer_sizes)
        self.register_buffer("layer_index", torch.as_tensor(index, dtype=torch.long),
                             persistent=False)
        centres = geometry.voxel_centres.astype(np.float32)
        half_extent = np.ones((geometry.n_voxels, 2), dtype=np.float32)
        has_xy = np.zeros(geometry.n_layers, dtype=bool)
        for position, (sl, layer) in enumerate(zip(geometry.layer_slices, geometry.layers)):
            if isinstance(layer, CartesianLayer):
                half_extent[sl] = [layer.nx * layer.dx / 2, layer.ny * layer.dy / 2]
                has_xy[position] = True
        self.register_buffer("coordinates", torch.as_tensor(centres / half_extent),
                             persistent=False)
        self.xy_layers = [int(i) for i in np.flatnonzero(has_xy)]
        self.n_layers = geometry.n_layers
        self.n_features = 2 * self.n_layers + 4 * len(self.xy_layers) + 2

    def _per_layer(self, values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(values.shape[0], self.n_layers)
        return out.index_add_(1, self.layer_index, values)

    def forward(self, voxels: torch.Tensor, incident_energy: torch.Tensor) -> torch.Tensor:
        e_inc = incident_energy[:, None]
        layer_energy = self._per_layer(voxels)
        safe = layer_energy + 1e-3 * e_inc
        sizes = self._per_layer(torch.ones_like(voxels[:1]))
        sparsity = self._per_layer((voxels <= 0).to(voxels.dtype)) / sizes
        columns = [torch.log10(layer_energy / e_inc + 1e-4), sparsity]
        for axis in (0, 1):
            coordinate = self.coordinates[:, axis]
            mean = self._per_layer(voxels * coordinate) / safe
            second = self._per_layer(voxels * coordinate ** 2) / safe
            # the floor (1 % of the half-extent) bounds the gradient for one-cell layers
            width = torch.sqrt((second - mean ** 2).clamp(min=0.0) + 1e-4)
            columns += [mean[:, self.xy_layers], width[:, self.xy_layers]]
        total = layer_energy.sum(1, keepdim=True)
        columns += [torch.log10(total / e_inc + 1e-4), (total - e_inc).abs() / e_inc]
        return torch.cat(columns, dim=1)


class AdversarialModel(ConditionedModel):
    """Base class of the GAN families (see the module docstring)."""

    config: GanConfig
    # micro-batches for sampling: large enough for vectorised convolutions, small enough for
    # the cache (1 thread, 10,000 showers: calogan 0.165 ms/shower at 256, 0.31 at 2000;
    # wgan 0.21 at 256, 0.35 at 2000)
    max_micro_batch = 256
    validation_label = "mean separation power of high-level features (validation)"
    validates_in_memory = True

    def __init__(self, geometry: Geometry, config: GanConfig | None = None) -> None:
        super().__init__(geometry)
        self.config = config or self.preset("cpu")
        self.config.validate()
        self.conditions = ConditionTransform()
        self.threshold_mev = 0.0
        self.module: GanModule | None = None
        self._last_validation: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


    # --- what a family provides -----------------------------------------------------------
    @abstractmethod
    def _fit_representation(self, train: ShowerData) -> None:
        """Fit the voxel representation's state on the training showers."""

    @abstractmethod
    def _encode(self, voxels: torch.Tensor, incident_energy: torch.Tensor) -> torch.Tensor:
        """Showers ``(B, n_voxels)`` MeV -> the networks' representation."""

    @abstractmethod
    def _decode(self, representation: torch.Tensor, incident_energy: torch.Tensor
                ) -> torch.Tensor:
        """The representation -> showers ``(B, n_voxels)`` MeV, thresholded (differentiable
        where above the threshold)."""

    @abstractmethod
    def _new_module(self) -> GanModule:
        """Build the generator and critic (needs the fitted conditions)."""

    @abstractmethod
    def _representation_state(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def _load_representation_state(self, state: dict[str, Any]) -> None:
        ...

    # --- training hooks ------------------------------------------------------------------
    def prepare_fit(self, train: ShowerData, resume: bool, device: str) -> None:
        if not resume:
            self.conditions.fit(train.incident_energies, train.conditions, train.condition_units)
            positive = train.showers[train.showers > 0]
            self.threshold_mev = float(positive.min()) if positive.size else 0.0
            self._fit_representation(train)
            torch.manual_seed(self.config.training.seed)
            self.module = self._new_module()
            with torch.no_grad():
                self.module.generator.start_from_mean(self._mean_representation(train))
        self._require_module()

    def _mean_representation(self, train: ShowerData) -> torch.Tensor:
        """The mean training shower in the representation. (The mean of the
        representation itself would, through its non-linearity, decode to far too little
        energy.)"""
        reference = float(np.exp(np.log(train.incident_energies).mean()))
        mean_fractions = (train.showers / train.incident_energies[:, None]).mean(0)
        fractions = torch.as_tensor(mean_fractions[None] * reference, dtype=torch.float32)
        return self._encode(fractions, torch.tensor([reference], dtype=torch.float32))[0]

    def players(self) -> dict[str, Player]:
        assert self.module is not None
        betas = (float(self.config.betas[0]), float(self.config.betas[1]))
        return {"critic": (list(self.module.critic.parameters()), self.config.critic_lr_factor,
                           betas),
                "generator": (list(self.module.generator.parameters()), 1.0, betas)}

    def player_schedule(self, step: int) -> tuple[str, ...]:
        if (step + 1) % self.config.n_critic == 0:
            return ("critic", "generator")
        return ("critic",)

    def _fake(self, context: torch.Tensor, incident_energy: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.module is not None
        z = torch.randn(len(context), self.config.latent_dim, generator=generator)
        representation = self.module.generator(z.to(context.device), context, incident_energy)
        return representation, self._decode(representation, incident_energy)

    def player_loss(self, name: str, batch: dict[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        assert self.module is not None
        critic = self.module.critic
        e_inc = batch["incident_energy"]
        context = self._context(batch)
        if name == "generator":
            fake, fake_voxels = self._fake(context, e_inc, generator)
            score = critic(fake, fake_voxels, context, e_inc)
            return -score.mean() if self.config.loss == "wgan-gp" else F.softplus(-score).mean()
        with torch.no_grad():
            fake, fake_voxels = self._fake(context, e_inc, generator)
        real, real_voxels = self._encode(batch["voxels"], e_inc), batch["voxels"]
        real_score = critic(real, real_voxels, context, e_inc)
        fake_score = critic(fake, fake_voxels, context, e_inc)
        if self.config.loss == "bce":
            return F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
        penalty = self._gradient_penalty(real, fake, e_inc, context, generator)
        return (fake_score.mean() - real_score.mean() + self.config.gp_weight * penalty
                + self.config.drift_weight * (real_score ** 2).mean())

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, e_inc: torch.Tensor,
                          context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(||grad_x critic(x)|| - 1)^2 at random points between real and generated showers."""
        assert self.module is not None
        shape = (len(real),) + (1,) * (real.dim() - 1)
        mix = torch.rand(shape, generator=generator).to(real.device)
        points = (mix * real + (1 - mix) * fake).requires_grad_(True)
        score = self.module.critic(points, self._decode(points, e_inc), context, e_inc)
        (gradient,) = torch.autograd.grad(score.sum(), points, create_graph=True)
        return ((gradient.flatten(1).norm(dim=1) - 1.0) ** 2).mean()

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The generator's loss (the Trainer uses ``player_loss`` for both players)."""
        return self.player_loss("generator", batch, generator)

    def validation_metric(self, tensors: dict[str, torch.Tensor], device: str) -> float:
        """Mean separation power of high-level features, validation showers vs generated."""
        n = min(len(tensors["incident_energy"]), self.config.validation_showers)
        energies = tensors["incident_energy"][:n].double().numpy()
        conditions = {k.split(".", 1)[1]: v[:n].numpy() for k, v in tensors.items()
                      if k.startswith("condition.")}
        generated = self.sample(energies, conditions, seed=VALIDATION_SEED, device=device).showers
        reference = tensors["voxels"][:n].numpy()
        self._last_validation = (reference, generated, energies)
        return mean_separation_power(reference, generated, energies, self.geometry)

    def on_epoch_end(self, run_dir: str, record: dict[str, Any]) -> None:
        """Plot the mean validation shower against the generated one (``diagnostics``)."""
        if not self.config.diagnostics or self._last_validation is None:
            return
        from ...plotting import plot_average_comparison

        reference, generated, energies = self._last_validation
        path = os.path.join(run_dir, "diagnostics", f"epoch_{record['epoch']:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        plot_average_comparison(reference, generated, energies, self.geometry, path,
                                title=f"{self.family}, epoch {record['epoch']}: mean separation "
                                      f"power {record['val_loss']:.4f}")

    # --- sampling --------------------------------------------------------------------------
    def sample(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray] | None = None,
               seed: int = 0, shard: int = 0, batch_size: int = 10_000, device: str = "cpu",
               ) -> ShowerData:
        return self._sample_from_noise(incident_energies, conditions, seed, shard, batch_size,
                                       device)

    def noise_features(self) -> int:
        return self.config.latent_dim

    def micro_batch(self, batch_size: int) -> int:
        return max(1, min(batch_size, self.max_micro_batch))

    def showers_from_noise(self, noise: torch.Tensor, batch: dict[str, torch.Tensor]
                           ) -> torch.Tensor:
        """The generator's showers ``(B, n_voxels)`` MeV for latent ``noise`` ``(B, latent)``."""
        assert self.module is not None
        e_inc = batch["incident_energy"]
        return self._decode(self.module.generator(noise, self._context(batch), e_inc), e_inc)

    # --- persistence -----------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "conditions": self.conditions.state(),
                "threshold_mev": self.threshold_mev, **self._representation_state()}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry) -> AdversarialModel:
        model = cls(geometry, GanConfig.from_dict(state["config"]))
        model.conditions = ConditionTransform.from_state(state["conditions"])
        model.threshold_mev = float(state["threshold_mev"])
        model._load_representation_state(state)
        model.module = model._new_module()
        return model


def mean_separation_power(reference: np.ndarray, generated: np.ndarray,
                          incident_energies: np.ndarray, geometry: Geometry) -> float:
    """Mean separation power over the high-level features (bins from the reference)."""
    threshold = geometry.threshold_mev
    ref = high_level_features(apply_threshold(reference, threshold), incident_energies, geometry)
    gen = high_level_features(apply_threshold(generated, threshold), incident_energies, geometry)
    powers = []
    for name, values in ref.values.items():
        bins = feature_bins(values, values, ref.kinds[name])
        powers.append(separation_power(values, gen.values[name], bins))
    return float(np.mean(powers))


def condition_maps(context: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The context ``(B, c)`` broadcast to constant image channels ``(B, c, height, width)``."""
    return context[:, :, None, None].expand(-1, -1, height, width)


def coordinate_maps(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Two channels holding each pixel's x and y in [-1, 1] (CoordConv), ``(B, 2, H, W)``."""
    ys = torch.linspace(-1, 1, height, dtype=like.dtype, device=like.device)
    xs = torch.linspace(-1, 1, width, dtype=like.dtype, device=like.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)


__all__ = ["AdversarialModel", "GanConfig", "GanModule", "MinibatchDiscrimination",
           "ShowerFeatures", "mean_separation_power", "condition_maps", "coordinate_maps"]
