"""CaloGAN-style GAN for layered Cartesian calorimeters with up to ~1000 cells.

Generator: the latent vector, scaled by E_inc / E_ref as in CaloGAN, with the standardised
conditions appended, feeds one stream per layer: dense -> (C, ny, nx) feature map ->
3x3 convolution -> locally connected 3x3 layer (weights not shared between positions) ->
softplus; cells below the threshold are set to zero after decoding. (CaloGAN's ReLU output
left most cells dead after two epochs here: a dead cell gets no gradient to come back.)
Layer to layer: from the second layer on, the previous layer's output, resized to this
layer's grid, enters the convolution as an extra channel (CaloGAN's attention / in-painting
between layers). The outputs are each cell's energy as a fraction of E_inc, in units of a
per-layer scale fitted on the training data.

Critic: per layer a convolution and a locally connected layer, pooled to a small grid;
with the per-layer energies, sparsities, centres and widths (:class:`ShowerFeatures`),
E_tot / E_inc, the energy balance |E_tot - E_inc| / E_inc, the conditions and
minibatch-discrimination features of all of these; an MLP head gives one score.

Recipe (Paganini et al., arXiv:1712.10321, as in ``docs/gans.md``): the original trains
with the non-saturating loss (``loss: bce`` in ``--config``), Adam with beta1 = 0.5, D 2e-5
and G 2e-4. The CPU preset uses the Wasserstein loss with gradient penalty (3 critic steps
per generator step, both at 2e-4, batch 128): on the 50k-shower calogan set the
non-saturating discriminator won within two epochs. Minibatch discrimination stays in the
critic (as minibatch statistics do in ProGAN's WGAN-GP critic).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ShowerData
from ...errors import GeometryError
from ...geometry import CartesianLayer, Geometry
from ...preprocessing import cut_below
from ...training import TrainingConfig
from .common import AdversarialModel, GanConfig, GanModule, MinibatchDiscrimination, ShowerFeatures

LEAK = 0.2


class LocallyConnected2d(torch.nn.Module):
    """A 2-D layer like a ``kernel x kernel`` convolution (zero padding, stride 1) whose
    weights differ at every position: ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, height: int, width: int,
                 kernel: int = 3) -> None:
        super().__init__()
        self.kernel, self.height, self.width = kernel, height, width
        fan_in = in_channels * kernel * kernel
        self.weight = torch.nn.Parameter(
            torch.randn(height * width, fan_in, out_channels) / np.sqrt(fan_in))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels, height * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, self.kernel, padding=self.kernel // 2)  # (B, fan_in, H*W)
        out = torch.einsum("bfp,pfo->bop", patches, self.weight) + self.bias
        return out.view(x.shape[0], -1, self.height, self.width)


def _layer_shapes(geometry: Geometry) -> list[tuple[int, int]]:
    shapes = []
    for layer in geometry.layers:
        if not isinstance(layer, CartesianLayer):
            raise GeometryError(f"calogan needs Cartesian layers; {geometry.name} layer "
                                f"{layer.layer_id} is cylindrical (use caloflow)")
        shapes.append((layer.ny, layer.nx))
    return shapes


def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: row i averages the input cells ``[floor(i n_in / n_out),
    ceil((i + 1) n_in / n_out))``, the windows of adaptive average pooling. Pooling a
    ``(B, C, H, W)`` image is then ``P_h x P_w^T`` (the windows are rectangles), which ONNX
    exports with its sizes fixed where ``adaptive_avg_pool2d`` needs them known at runtime."""
    matrix = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


class CaloGanGenerator(torch.nn.Module):
    """``(z (B, latent), context (B, c)) -> (B, n_voxels)`` scaled cell fractions >= 0."""

    def __init__(self, shapes: list[tuple[int, int]], latent_dim: int, n_context: int,
                 width: int, reference_energy_mev: float) -> None:
        super().__init__()
        self.shapes, self.width = shapes, width
        self.reference_energy = reference_energy_mev
        inputs = latent_dim + n_context
        self.dense = torch.nn.ModuleList(torch.nn.Linear(inputs, width * h * w)
                                         for h, w in shapes)
        self.conv = torch.nn.ModuleList(
            torch.nn.Conv2d(width + (1 if i else 0), width, 3, padding=1)
            for i in range(len(shapes)))
        self.local = torch.nn.ModuleList(LocallyConnected2d(width, 1, h, w) for h, w in shapes)
        # each layer's image pooled to the next layer's shape (not saved: fixed by the shapes)
        for i in range(1, len(shapes)):
            (h0, w0), (h, w) = shapes[i - 1], shapes[i]
            self.register_buffer(f"pool_rows_{i}", adaptive_pool_matrix(h0, h), persistent=False)
            self.register_buffer(f"pool_cols_{i}", adaptive_pool_matrix(w0, w), persistent=False)

    def start_from_mean(self, mean: torch.Tensor) -> None:
        """Output ~ the mean training fractions ``(n_voxels,)`` at initialisation: each
        locally connected output layer's per-cell bias set to their inverse softplus, its
        weights scaled down."""
        sizes = [h * w for h, w in self.shapes]
        inverse_softplus = torch.log(torch.expm1(mean.clamp(min=1e-8)))
        layers: list[Any] = list(self.local)
        for local, block in zip(layers, torch.split(inverse_softplus, sizes)):
            local.bias.data.copy_(block[None])
            local.weight.data.mul_(0.1)

    def forward(self, z: torch.Tensor, context: torch.Tensor, incident_energy: torch.Tensor
                ) -> torch.Tensor:
        # CaloGAN multiplies the latent by the incident energy (here over a reference)
        scale = (incident_energy / self.reference_energy)[:, None]
        h = torch.cat([z * scale, context], dim=1)
        outputs, previous = [], None
        for i, (height, width) in enumerate(self.shapes):
            x = F.leaky_relu(self.dense[i](h), LEAK).view(z.shape[0], self.width, height, width)
            if previous is not None:
                pooled = torch.einsum("hk,bckl,wl->bchw", getattr(self, f"pool_rows_{i}"),
                                      previous, getattr(self, f"pool_cols_{i}"))
                x = torch.cat([x, pooled], dim=1)
            x = F.leaky_relu(self.conv[i](x), LEAK)
            previous = F.softplus(self.local[i](x))
            outputs.append(previous.flatten(1))
        return torch.cat(outputs, dim=1)


class CaloGanCritic(torch.nn.Module):
    """``(fractions (B, n_voxels), voxels (B, n_voxels) MeV, context) -> (B,)`` scores."""

    def __init__(self, geometry: Geometry, n_context: int, width: int,
                 minibatch_kernels: int, threshold_mev: float) -> None:
        super().__init__()
        self.shapes = _layer_shapes(geometry)
        self.sizes = [h * w for h, w in self.shapes]
        self.pooled = [(min(h, 6), min(w, 6)) for h, w in self.shapes]
        self.conv = torch.nn.ModuleList(torch.nn.Conv2d(1, width, 3, padding=1)
                                        for _ in self.shapes)
        self.local = torch.nn.ModuleList(LocallyConnected2d(width, width // 2, h, w)
                                         for h, w in self.shapes)
        self.project = torch.nn.ModuleList(torch.nn.Linear(width // 2 * ph * pw, 64)
                                           for ph, pw in self.pooled)
        self.features = ShowerFeatures(geometry)
        summary = 64 * len(self.shapes) + self.features.n_features + n_context
        self.minibatch = (MinibatchDiscrimination(summary, minibatch_kernels)
                          if minibatch_kernels else None)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(summary + minibatch_kernels, 128), torch.nn.LeakyReLU(LEAK),
            torch.nn.Linear(128, 1))

    def forward(self, fractions: torch.Tensor, voxels: torch.Tensor, context: torch.Tensor,
                incident_energy: torch.Tensor) -> torch.Tensor:
        streams = []
        for i, block in enumerate(torch.split(fractions, self.sizes, dim=1)):
            x = block.view(block.shape[0], 1, *self.shapes[i])
            x = F.leaky_relu(self.conv[i](x), LEAK)
            x = F.leaky_relu(self.local[i](x), LEAK)
            x = F.adaptive_avg_pool2d(x, self.pooled[i]).flatten(1)
            streams.append(F.leaky_relu(self.project[i](x), LEAK))
        summary = torch.cat(streams + [self.features(voxels, incident_energy), context], dim=1)
        if self.minibatch is not None:
            summary = torch.cat([summary, self.minibatch(summary)], dim=1)
        return self.head(summary).squeeze(1)


class CaloGan(AdversarialModel):
    """CaloGAN-style generator and discriminator (see the module docstring).

    Example::

        model = CaloGan(get_geometry("calogan"), CaloGan.preset("cpu"))
        model.fit(train_data, "runs/calogan")
        generated = model.sample(reference.incident_energies, seed=1)
    """

    family = "calogan"

    def __init__(self, geometry: Geometry, config: GanConfig | None = None) -> None:
        _layer_shapes(geometry)
        super().__init__(geometry, config)
        self.layer_scale = [1.0] * geometry.n_layers

    PRESETS = {
        # CPU: narrow streams (the locally connected layers dominate the cost) and the
        # Wasserstein loss: with the published non-saturating loss the discriminator won
        # within two epochs of the 50k-shower set (its loss -> 0.01, generated showers too
        # sparse and too energetic)
        "cpu": lambda: GanConfig(
            latent_dim=64, generator_width=8, critic_width=8, loss="wgan-gp", n_critic=3,
            critic_lr_factor=1.0, betas=[0.5, 0.9], minibatch_features=8,
            training=TrainingConfig(epochs=200, batch_size=128, learning_rate=2e-4,
                                    weight_decay=0.0, schedule="constant", grad_clip=100.0,
                                    time_budget_s=30 * 60)),
        "tiny": lambda: GanConfig(
            latent_dim=16, generator_width=4, critic_width=4, loss="bce", n_critic=1,
            critic_lr_factor=0.5, betas=[0.5, 0.999], minibatch_features=4,
            validation_showers=200,
            training=TrainingConfig(epochs=2, batch_size=64, learning_rate=2e-4,
                                    weight_decay=0.0, schedule="constant", grad_clip=100.0)),
    }

    def _fit_representation(self, train: ShowerData) -> None:
        fractions = train.showers / train.incident_energies[:, None]
        self.layer_scale = [float(max(fractions[:, sl].max(axis=1).mean(), 1e-9))
                            for sl in self.geometry.layer_slices]

    def _scale_vector(self, like: torch.Tensor) -> torch.Tensor:
        sizes = torch.as_tensor(self.geometry.layer_sizes, device=like.device)
        return torch.repeat_interleave(torch.as_tensor(self.layer_scale, dtype=like.dtype,
                                                       device=like.device), sizes)

    def _encode(self, voxels: torch.Tensor, incident_energy: torch.Tensor) -> torch.Tensor:
        return voxels / (incident_energy[:, None] * self._scale_vector(voxels))

    def _decode(self, representation: torch.Tensor, incident_energy: torch.Tensor
                ) -> torch.Tensor:
        voxels = representation * self._scale_vector(representation) * incident_energy[:, None]
        return cut_below(voxels, self.threshold_mev)

    def _new_module(self) -> GanModule:
        n_context = self.conditions.n_features
        shapes = _layer_shapes(self.geometry)
        generator = CaloGanGenerator(shapes, self.config.latent_dim, n_context,
                                     self.config.generator_width,
                                     reference_energy_mev=10 ** self.conditions.log_e_mean)
        critic = CaloGanCritic(self.geometry, n_context, self.config.critic_width,
                               self.config.minibatch_features, self.threshold_mev)
        return GanModule(generator, critic)

    def _representation_state(self) -> dict[str, Any]:
        return {"layer_scale": self.layer_scale}

    def _load_representation_state(self, state: dict[str, Any]) -> None:
        self.layer_scale = [float(v) for v in state["layer_scale"]]


__all__ = ["CaloGan", "CaloGanGenerator", "CaloGanCritic", "LocallyConnected2d"]
