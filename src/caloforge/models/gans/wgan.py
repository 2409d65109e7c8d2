"""Conditional WGAN-GP for calorimeter images (the LHCb ECAL recipe), e.g. lhcb-ecal 30x30.

Conditions: the incident energy and every extra condition of the training file (for
lhcb-ecal the entry point (x, y) in mm and the direction as two angles in rad), standardised.
Cells are Box-Cox transformed with lambda fitted on the training cells and saved with the
model (:class:`~caloforge.preprocessing.BoxCoxTransform`). Unlike the LHCb paper, the
transform is applied to each cell's energy as a fraction of E_inc rather than to the raw
energy: the representation then hardly depends on E_inc, so the generator, which starts
from the mean training image, only has to learn shapes and fluctuations (measured: the raw
energies left E_tot/E_inc far off after minutes of CPU training). Layers of equal shape
are image channels.

Generator: [z, conditions] -> dense -> (4w, s, s) -> three transposed convolutions
(stride 2), each followed by the conditions as constant channels -> (w/2, 8s, 8s) with
x/y coordinate channels (CoordConv, so a requested entry point can be placed precisely)
-> 3x3 convolution -> centre crop to (ny, nx).

Critic: the image with coordinate and condition channels -> four convolutions (three of
stride 2) -> flattened, with the conditions and physics summaries of the decoded shower
(:class:`ShowerFeatures`: energy share, centre and width, sparsity), -> MLP -> score. With
the centre of energy next to the requested entry point, the critic sees a mismatch
directly, which makes the generator respond to its conditions early in training.

Training: the Wasserstein loss with gradient penalty (lambda = 10) plus a small drift term,
Adam (betas 0.5 / 0.9), constant rate. The published recipe uses 5 critic steps per
generator step at lr 1e-4; the CPU preset takes 3 at 2e-4, for more generator steps within
a CPU budget (``n_critic`` and ``training.learning_rate`` in ``--config``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...data import ShowerData
from ...errors import GeometryError
from ...geometry import CartesianLayer, Geometry
from ...preprocessing import BoxCoxTransform, cut_below
from ...training import TrainingConfig
from .common import (
    AdversarialModel,
    GanConfig,
    GanModule,
    ShowerFeatures,
    condition_maps,
    coordinate_maps,
)

LEAK = 0.2
UPSAMPLINGS = 3
BOXCOX_SHIFT = 1e-5  # fraction of E_inc


def image_shape(geometry: Geometry) -> tuple[int, int, int]:
    """(channels = layers, ny, nx) of a geometry whose layers are equal Cartesian grids."""
    image = geometry.uniform_layer_image
    if image is None or image[0] != "cartesian":
        raise GeometryError(f"wgan needs Cartesian layers of one shape (e.g. lhcb-ecal); "
                            f"{geometry.name} has other layers (use calogan or caloflow)")
    ny, nx = image[1]
    return geometry.n_layers, ny, nx


def _centre_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top:top + height, left:left + width]


def translate(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move image content by ``shift`` ``(B, 2)`` (x, y in units of the half-extent, the
    [-1, 1] grid of ``grid_sample``), bilinear, edge values outside: ``(B, C, H, W)``."""
    batch, _, height, width = images.shape
    theta = images.new_zeros(batch, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -shift  # output pixel p samples the input at p - shift
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


class Aligner(torch.nn.Module):
    """Where a shower's axis crosses the calorimeter, from the conditions:
    ``entry + depth * tan(angle)`` per axis (mm), in units of the image's half-extent.

    ``depth_mm`` (x, y) is fitted on the training data (regression of the centre of energy
    on the track angle) and refined in training. The generator draws showers in the frame
    of this point and moves them there, so that its response to the entry point and
    direction is right from the first step instead of having to be learnt.
    """

    mean: torch.Tensor  # buffers
    std: torch.Tensor
    half_extent: torch.Tensor

    def __init__(self, columns: dict[str, list[int]], mean: list[float], std: list[float],
                 depth_mm: list[float], half_extent_mm: list[float]) -> None:
        super().__init__()
        self.columns = columns  # "entry_point" / "direction" -> context columns (x, y)
        self.register_buffer("mean", torch.as_tensor(mean), persistent=False)
        self.register_buffer("std", torch.as_tensor(std), persistent=False)
        self.register_buffer("half_extent", torch.as_tensor(half_extent_mm), persistent=False)
        self.depth = torch.nn.Parameter(torch.as_tensor(depth_mm, dtype=torch.float32))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        raw = context * self.std + self.mean
        shift = context.new_zeros(context.shape[0], 2)
        if "entry_point" in self.columns:
            shift = shift + raw[:, self.columns["entry_point"]]
        if "direction" in self.columns:
            shift = shift + self.depth * torch.tan(raw[:, self.columns["direction"]])
        return shift / self.half_extent


class WganGenerator(torch.nn.Module):
    """``(z (B, latent), context (B, c), E_inc) -> (B, layers, ny, nx)`` Box-Cox values."""

    def __init__(self, shape: tuple[int, int, int], latent_dim: int, n_context: int,
                 width: int, aligner: Aligner | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.aligner = aligner
        channels, ny, nx = shape
        self.start = math.ceil(max(ny, nx) / 2 ** UPSAMPLINGS)
        widths = [4 * width, 2 * width, width, max(width // 2, 1)]
        self.widths = widths
        self.dense = torch.nn.Linear(latent_dim + n_context, widths[0] * self.start ** 2)
        self.up = torch.nn.ModuleList(
            torch.nn.ConvTranspose2d(widths[i] + n_context, widths[i + 1], 4, stride=2, padding=1)
            for i in range(UPSAMPLINGS))
        self.out = torch.nn.Conv2d(widths[-1] + n_context + 2, channels, 3, padding=1)
        # per-cell offset of the output (the mean training image after start_from_mean)
        self.offset = torch.nn.Parameter(torch.zeros(shape))

    def start_from_mean(self, mean: torch.Tensor) -> None:
        """Output ~ the mean training image ``(layers, ny, nx)`` at initialisation."""
        self.offset.data.copy_(mean)
        self.out.weight.data.mul_(0.1)
        assert self.out.bias is not None
        self.out.bias.data.zero_()

    def forward(self, z: torch.Tensor, context: torch.Tensor, incident_energy: torch.Tensor
                ) -> torch.Tensor:
        x = F.leaky_relu(self.dense(torch.cat([z, context], 1)), LEAK)
        x = x.view(z.shape[0], self.widths[0], self.start, self.start)
        for up in self.up:
            x = torch.cat([x, condition_maps(context, *x.shape[-2:])], 1)
            x = F.leaky_relu(up(x), LEAK)
        height, width = x.shape[-2:]
        x = torch.cat([x, condition_maps(context, height, width),
                       coordinate_maps(x.shape[0], height, width, like=x)], 1)
        images = _centre_crop(self.out(x), *self.shape[1:]) + self.offset
        if self.aligner is not None:
            images = translate(images, self.aligner(context))
        return images


class WganCritic(torch.nn.Module):
    """``(images, voxels (B, n_voxels) MeV, context, E_inc) -> (B,)`` Wasserstein scores."""

    def __init__(self, geometry: Geometry, n_context: int, width: int,
                 threshold_mev: float, use_features: bool = True) -> None:
        super().__init__()
        channels, ny, nx = image_shape(geometry)
        inputs = channels + 2 + n_context
        self.convs = torch.nn.ModuleList([
            torch.nn.Conv2d(inputs, width, 3, padding=1),
            torch.nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            torch.nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
            torch.nn.Conv2d(4 * width, 4 * width, 4, stride=2, padding=1)])
        with torch.no_grad():
            flat = self._convolve(torch.zeros(1, inputs, ny, nx)).shape[1]
        self.features = ShowerFeatures(geometry) if use_features else None
        n_features = self.features.n_features if self.features is not None else 0
        self.head = torch.nn.Sequential(
            torch.nn.Linear(flat + n_context + n_features, 128),
            torch.nn.LeakyReLU(LEAK), torch.nn.Linear(128, 1))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LEAK)
        return x.flatten(1)

    def forward(self, images: torch.Tensor, voxels: torch.Tensor, context: torch.Tensor,
                incident_energy: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        x = torch.cat([images, coordinate_maps(images.shape[0], height, width, like=images),
                       condition_maps(context, height, width)], 1)
        parts = [self._convolve(x), context]
        if self.features is not None:
            parts.append(self.features(voxels, incident_energy))
        summary = torch.cat(parts, 1)
        return self.head(summary).squeeze(1)


class Wgan(AdversarialModel):
    """Conditional WGAN-GP with Box-Cox preprocessing (see the module docstring).

    Example::

        geometry = get_geometry("lhcb-ecal")
        train = read_showers("lhcb_train.h5", geometry)
        model = Wgan(geometry, Wgan.preset("cpu"))
        model.fit(train, "runs/wgan")
        generated = model.sample(train.incident_energies, {
            "entry_point": train.conditions["entry_point"],
            "direction": train.conditions["direction"]})
    """

    family = "wgan"

    def __init__(self, geometry: Geometry, config: GanConfig | None = None) -> None:
        self.shape = image_shape(geometry)
        super().__init__(geometry, config)
        self.boxcox = BoxCoxTransform()
        self.depth_mm: list[float] | None = None  # None: no entry point / direction

    ALIGNED_CONDITIONS = ("entry_point", "direction")

    PRESETS = {
        "cpu": lambda: GanConfig(
            latent_dim=64, generator_width=16, critic_width=16, loss="wgan-gp", n_critic=3,
            betas=[0.5, 0.9], training=TrainingConfig(
                epochs=500, batch_size=64, learning_rate=2e-4, weight_decay=0.0,
                schedule="constant", grad_clip=100.0, time_budget_s=30 * 60)),
        "tiny": lambda: GanConfig(
            latent_dim=8, generator_width=4, critic_width=4, loss="wgan-gp", n_critic=2,
            validation_showers=200, training=TrainingConfig(
                epochs=2, batch_size=64, learning_rate=1e-3, weight_decay=0.0,
                schedule="constant", grad_clip=100.0)),
    }

    def _fit_representation(self, train: ShowerData) -> None:
        # the Box-Cox shift in units of E_inc: cells below ~1e-5 E_inc carry no weight in
        # any feature; compressing them keeps the range the generator must span small
        shift = max(BOXCOX_SHIFT, self.threshold_mev / float(train.incident_energies.max()))
        self.boxcox = BoxCoxTransform(threshold_mev=shift)
        self.boxcox.fit(train.showers / train.incident_energies[:, None],
                        seed=self.config.training.seed)
        self.depth_mm = self._fit_depth(train)

    def _aligned_columns(self) -> dict[str, list[int]]:
        """Context columns of the (x, y) entry point and direction, where present."""
        columns, start = {}, 1
        for name in self.conditions.names:
            width = len(self.conditions.condition_mean[name])
            if name in self.ALIGNED_CONDITIONS and width == 2:
                columns[name] = [start, start + 1]
            start += width
        return columns

    def _fit_depth(self, train: ShowerData) -> list[float] | None:
        """Depth (mm, per axis) at which the centre of energy sits along the track:
        least squares of (centre - entry) on tan(angle)."""
        if not self._aligned_columns():
            return None
        if "direction" not in train.conditions:
            return [0.0, 0.0]
        energy = train.showers.sum(1)
        keep = energy > 0
        centre = (train.showers[keep] @ self.geometry.voxel_centres) / energy[keep, None]
        entry = np.asarray(train.conditions.get("entry_point", np.zeros((len(train), 2))))
        tangent = np.tan(np.asarray(train.conditions["direction"]))[keep]
        offset = centre - entry[keep]
        return [float((tangent[:, i] @ offset[:, i]) / max(tangent[:, i] @ tangent[:, i], 1e-12))
                for i in range(2)]

    def _aligner(self) -> Aligner | None:
        columns = self._aligned_columns()
        if not columns or self.depth_mm is None:
            return None
        mean = [self.conditions.log_e_mean]
        std = [self.conditions.log_e_std]
        for name in self.conditions.names:
            mean += self.conditions.condition_mean[name]
            std += self.conditions.condition_std[name]
        layer = self.geometry.layers[0]
        assert isinstance(layer, CartesianLayer)
        return Aligner(columns, mean, std, self.depth_mm,
                       [layer.nx * layer.dx / 2, layer.ny * layer.dy / 2])

    def _mean_representation(self, train: ShowerData) -> torch.Tensor:
        """The mean training shower in the generator's frame (each shower moved back by
        its aligned offset before averaging), in the representation."""
        aligner = self._aligner()
        if aligner is None:
            return super()._mean_representation(train)
        fractions = torch.as_tensor(train.showers / train.incident_energies[:, None],
                                    dtype=torch.float32).view(len(train), *self.shape)
        # only the conditions are needed (not a second float32 copy of every shower)
        batch = self._condition_batch(train.incident_energies, train.conditions, 0, len(train),
                                      "cpu")
        with torch.no_grad():
            shift = aligner(self._context(batch))
            mean_fractions = torch.cat([translate(f, -s) for f, s in zip(
                torch.split(fractions, 4096), torch.split(shift, 4096))]).mean(0)
        reference = float(np.exp(np.log(train.incident_energies).mean()))
        return self._encode(mean_fractions.reshape(1, -1) * reference,
                            torch.tensor([reference], dtype=torch.float32))[0]

    def _encode(self, voxels: torch.Tensor, incident_energy: torch.Tensor) -> torch.Tensor:
        fractions = voxels / incident_energy[:, None]
        return self.boxcox.forward(fractions).view(len(voxels), *self.shape)

    def _decode(self, representation: torch.Tensor, incident_energy: torch.Tensor
                ) -> torch.Tensor:
        voxels = self.boxcox.inverse_soft(representation.flatten(1)) * incident_energy[:, None]
        return cut_below(voxels, self.threshold_mev)

    def _new_module(self) -> GanModule:
        n_context = self.conditions.n_features
        return GanModule(
            WganGenerator(self.shape, self.config.latent_dim, n_context,
                          self.config.generator_width, self._aligner()),
            WganCritic(self.geometry, n_context, self.config.critic_width, self.threshold_mev,
                       self.config.critic_features))

    def _representation_state(self) -> dict[str, Any]:
        return {"boxcox": self.boxcox.state(), "depth_mm": self.depth_mm}

    def _load_representation_state(self, state: dict[str, Any]) -> None:
        self.boxcox = BoxCoxTransform.from_state(state["boxcox"])
        self.depth_mm = state.get("depth_mm")


__all__ = ["Wgan", "WganGenerator", "WganCritic", "image_shape"]
