"""Convolutional layer-to-layer flows (L2LFlows with U-Net coupling blocks).

For highly granular calorimeters (the ILD ECAL: 30 layers of 30 x 30 cells; CaloChallenge
dataset 3: 45 layers of 18 radial x 50 angular bins) masked autoregressive flows over a
layer stop scaling; convolutional coupling flows scale with the image and sample in one
pass:

* the energy flow (a MADE-RQS MAF, :class:`~caloforge.models.flows.layered.LayerEnergyFlows`'
  Flow-1): all layer energies ``(L,)`` given the conditions;
* one :class:`~caloforge.models.flows.conv_blocks.ConvFlow` per layer (``shared: false``, the
  published choice) or ONE shared by every layer with a learned layer embedding
  (``shared: true``): the layer image in logit space ``(1, H, W)`` given, as image
  channels, the previous ``previous_layers`` layers (default 5; missing ones before the
  first layer read as empty), the standardised log layer energy and the conditions.

Preprocessing (:class:`~caloforge.preprocessing.MaxLogTransform`): noise on empty cells,
divide by the layer energy (the published recipe divides by the layer maximum:
``normalise_by: max``), ``log10(x + 1e-7) / 7 + 1``, logit (alpha 1e-2), then
(``standardise_cells``) minus the training data's mean of that cell over one pooled spread
per layer. After generation each layer is rescaled to its sampled energy and cut at the
readout threshold; optionally (``postprocess: spline``) a monotone 1-D spline fitted
between generated and reference cell-energy quantiles corrects the cell spectrum
(``layer-spline``: one such spline per layer).

Cylindrical layers are images ``(radial, angular)`` whose angular axis wraps around
(circular padding; training rolls every shower by a random angle). Cartesian layers are
``(y, x)`` images with zero padding. Image sides must be even (one squeeze).

Per-layer flows are independent given the data: ``layers: "0-9"`` trains a subset of the
parts (``energy`` is the energy flow) and :func:`merge_runs` joins runs trained on
disjoint parts into one model, the unit of parallel training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core_fraction import (
    CoreFractionMap,
    apply_core_fraction_maps,
    check_core_fraction_options,
    core_cells,
    core_fraction_maps_from_state,
    fit_option_maps,
    hit_regressors_option,
)
from ...data import ShowerData, ShowerStream, first_showers
from ...errors import CaloforgeError, GeometryError, OptionError
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
    MaxLogTransform,
    VoxelTransform,
    group_occupancy_cuts,
    group_quantile_map_nodes,
    hit_rate_groups,
    layer_quantile_map_nodes,
    lowest_hit,
    monotone_log_map,
    quantile_map_nodes,
    rescale_hits,
    uniform_noise,
)
from ...ring_spread import RingSpreadMap, check_ring_spread_option, fit_ring_spread
from ...training import DEFAULT_BETAS, Player, TrainingConfig, config_from_dict
from .conv_blocks import ConvFlow, squeeze, unsqueeze
from .layered import LayerEnergyFlows, finite_logits, threshold_and_noise
from .toolkit import FlowConfig, build_maf

ENERGY_PART = "energy"
ENERGY_PLAYER = "energy"  # the energy flow's own optimiser (``energy_steps``)
CUT_GROUPS = ("hit-rate", "hit-rate-block", "ring", "ring-block", "layer")
LAYER_ENERGIES = ("noisy", "deposited")
POSTPROCESS_ENERGIES = ("kept", "restored", "drawn")
LAYER_HITS = ("none", "calibrated")
POSTPROCESS = ("none", "spline", "layer-spline", "group-spline")
CELL_SCALES = ("layer", "cell", "robust", "block")
SYMMETRIES = ("none", "d4", "rotations")
CORE_SPLITS = ("none", "calibrated")
# d4: flip x, flip y, transpose (the 8 elements of the square's group); rotations: reflect,
# turn (the third unused: one noise layout for both)
SYMMETRY_BITS = 3


@dataclass
class ConvFlowConfig:
    """Architecture, preprocessing and training of the convolutional L2LFlows.

    ``layers``: the parts a run trains, ``"all"`` or a comma list of ``energy`` and layer
    indices / ranges (``"energy,0-9"``); ``noise_mev`` / ``threshold_mev``: None = a hundredth
    of / the geometry's readout threshold (geometries without one: the smallest non-zero
    training cell); ``postprocess``: ``none``, ``spline`` (one monotone map of the hit
    spectrum for all layers, fitted after the hit calibration) or ``layer-spline`` (one per
    layer: on ild-ecal the cut energy the layer keeps heats the core, and each layer's map
    takes it back into the layer's spectrum; layers with too few hits keep theirs) or
    ``group-spline`` (one per group of ``hit_calibration_groups``, ``nodes // 4`` quantiles:
    the hits of each group, e.g. the cells a layer's showers hit in 0.1-0.3 % of the
    showers, get that group's spectrum; on ild-ecal the few far-halo hits are single
    particles of ~0.16 MeV in the data but up to several MeV generated, which widens the
    radial profile; groups with too few hits keep theirs); ``postprocess_energy``: after
    the spline(s) each layer is ``kept`` as mapped (default) or ``restored`` to its energy
    before them (all hits scaled alike; hits stay at or above the threshold) or ``drawn``:
    scaled to the deposit the energy flow drew for it (needs ``layer_energy: deposited``).
    Why: the maps act per cell and move the layer sums the energy flow drew (ild-ecal,
    last layers: 0.80-0.90x the data's energy after them); the cuts and counts move them
    too, shower by shower and layer by layer, which loosens the layers' correlations
    (ild-ecal: adjacent layers' energies correlated 0.76 generated against 0.84; the
    energy columns alone give 20,000 showers away at AUC 0.83 while the energy flow's own
    draws give 0.61), so ``drawn`` hands the classifier the energy flow's joint draws;
    ``layers_per_step``: train k random layers of the run's parts in each step (0 = all),
    the term scaled to an unbiased estimate of the full likelihood: memory and time per
    step shrink by k / L (validation always scores every layer);
    ``normalise_by``: each layer image is divided by its ``energy`` (default), by its
    ``max`` (the published preprocessing: it puts one cell of every image at exactly the top
    of the range, a point mass that left generated cores ~20 % too faint in the issue-28
    experiment, docs/convflow.md) or by one ``fixed`` scale fitted on the training data
    (the readout threshold then sits at one value in the flow's space for every shower);
    ``position_channels``: add the cell coordinates as condition channels (Cartesian: x
    and y, cylinders: r; the angle stays out so that roll augmentation keeps its meaning).
    A convolution cannot tell where in the image it is, so without them a layer flow must
    learn the shower's position from the previous layers. Off by default: one ILD run with
    them did not yet improve the classifier (README), and False keeps older models loadable;
    ``standardise_cells``: each layer flow sees its image in logit space minus the training
    data's mean of each cell of that layer, divided by the layer's pooled spread (cylinders:
    averaged over the angle), so that the untrained flow already samples a shower where the
    data has it. Without it the ILD flows learnt a position-free picture
    in which the core, always in the same central cells, was a 2.6-sigma event per value
    (docs/convflow.md). Models saved before the option load without it;
    ``cell_scale``: the spread standardisation divides by: ``layer`` (default: the layer's
    pooled spread), ``cell`` (each cell's own, at least half the pooled one), ``robust``
    (the smaller of each cell's standard deviation and its interquartile range / 1.349 over
    the first 4,000 showers, at least half the pooled one: a cell empty in a minority of
    showers is scaled by the spread of its hits) or ``block`` (each 2x2 block, the four
    cells one squeezed pixel of the flow holds, whitened with its own 4x4 covariance: ZCA,
    eigenvalues floored at a quarter of the pooled variance). The untrained flow samples
    every cell with the divisor as its spread; per-cell divisors add a block's common mode
    to its split, ``block`` gives each the data's spread (on ild-ecal: the core's split and
    hottest cell at the data's, the best likelihood, but wider radial widths;
    docs/convflow.md "What the hot core is");
    ``hit_calibration_showers``: after training, the model samples the conditions of this
    many training showers and sets one cut per group of cells (MeV, >= the threshold) that
    leaves it each group's hits of those showers (0: off, the readout threshold only);
    ``hit_calibration_groups``: ``hit-rate`` (per layer, cells binned by how often the
    training showers hit them: no geometry assumed), ``hit-rate-block`` (the same, each
    bin split by the cell's place in its 2 x 2 squeeze block, i.e. by the flow channel that
    draws it: the flows favour one place in the far halo) and by whether the block lies on
    the image's zero-padded border (where they make too many hits; docs/convflow.md "The
    halo's hit pattern"), ``ring`` (per layer and ring around
    the image centre, one cell wide; cylinders: per radial bin), ``ring-block`` (the rings
    split alike, by place and border) or ``layer``. Meant with
    ``noise_mev`` near the cut (e.g. 0.9 x the threshold): the flows then make the faint
    halo and too many noise crossings, and the cuts keep the data's hits in each group
    (ild-ecal slice: every ring's hits at the data's, docs/convflow.md "The halo");
    ``layer_energy``: what the energy flow learns and the voxel flows are conditioned on,
    each layer's ``noisy`` sum (with the dequantisation noise of its empty cells; saved
    models before the option) or its ``deposited`` energy (the cells above the threshold;
    empty layers dequantised below a tenth of it); sampling then scales each generated image
    so that its hits carry the deposit (:func:`~caloforge.preprocessing.scale_to_deposit`).
    With noise near the cut the noisy sum of an ILD layer holds ~30 MeV of noise, more than
    the deposit of its first and last layers;
    ``hit_calibration_bins``: k > 1 splits the calibration showers into k quantile bins of
    the incident energy times k of the deposited fraction (total deposit / E_inc; the
    energy flow's deposit for the model, the cells' for the data; needs ``layer_energy:
    deposited``), each of the k x k bins with its own cuts: a group's hits then follow the
    incident energy and the shower's deposit. Why: in the ild-ecal data the halo's hits
    rise with the deposit (correlation 0.85 at fixed E_inc), in the flows' draws they do
    not (docs/convflow.md "The halo's hit pattern");
    ``hit_calibration_energy``: where the energy of the cells a calibrated cut empties
    goes: ``layer`` (default; the layer's kept cells in proportion, so mostly into the core)
    or ``group`` (first the kept cells of the same calibration group, so halo energy stays
    in the halo; groups left empty give theirs to the layer). On ild-ecal the proportional
    rule made the hot core: before the cuts the middle layers' hottest cell is the data's
    (docs/convflow.md);
    ``temperature``: the voxel flows' base noise is drawn with this standard deviation when
    sampling (1: the trained density; below 1: draws nearer the flows' mode, as Glow samples;
    the energy flow keeps 1). Set after training (``--config`` or model.json), it acts on
    the hit calibration and the spline fit as on generation;
    ``energy_steps``: extra optimiser steps of the energy flow per training step, each on
    its own random batch of the training showers' layer energies (the energy flow then has
    its own optimiser; needs ``layer_energy: deposited``). Why: a step of the voxel flows
    costs ~13 s on one ILD core and one of the energy flow ~10 ms, so trained together the
    energy flow saw ~240 batches in 30 minutes and its layer energies alone were told from
    the data's with AUC 0.95 (40 epochs of it alone: 0.54; docs/convflow.md "The far
    halo's hits and the layer energies' correlations");
    ``layer_hits``: ``calibrated`` fits, after training, one boundary per layer on the
    energy flow's draws for the first ``layer_hit_showers`` training showers' conditions, so
    that each layer is empty as often as in the data, and maps the draws above it quantile
    to quantile onto the data's hit deposits, the order of the showers kept; only layers
    where the flow draws too few hits (:class:`~caloforge.layer_hits.LayerHitMap`; needs
    ``layer_energy: deposited``). Fitted before, and so seen by, the cuts, counts, splines
    and core maps. Why: a smooth density smears the jump from an empty layer to a hit of at
    least the threshold, and the first ild-ecal layer had a hit in 1.0-1.2 % of the
    generated showers against the data's 2.5 % (docs/convflow.md "Layers that are rarely
    hit"). Set after training;
    ``symmetrise``: ``d4`` turns every generated shower (all its layers alike) by one of the
    8 symmetries of the square grid (flips in x and y, transposition), drawn uniformly per
    shower from three more numbers of its noise. Only where the data are invariant under
    them: square Cartesian layers, the particle along the grid's axis, no conditions but
    the incident energy (ild-ecal). Why: the flows draw each 2 x 2 squeeze block's four
    cells as four channels and, in the far halo, favour one of the four places (2x its hits);
    the classifier sees that hit pattern (docs/convflow.md "The halo's hit pattern"). Over
    an invariant data distribution the symmetrised model is never further away (in KL) than
    the model itself. ``rotations``: the same for cylinders (calochallenge-2/3), every shower
    turned by one of the ``n_alpha`` angular steps and reflected (alpha -> -alpha) with
    probability 1/2, drawn from two of the three numbers: the flows' 2 x 2 squeeze blocks
    pair neighbouring angular bins, and training's random rolls make the flows nearly, not
    exactly, invariant. Set after training; acts on generation only;
    ``hit_counts``: ``layer`` draws each shower's number of hits per layer, ``band`` per
    radial band of each layer (cells 0-2, 2-4, 4-6, 6-9, 9-14 and 14+ from the centre; the
    rows of cylinders), ``core-band`` with the first band split at 1 cell (the central
    cells' hits drawn as the data has them), from a model fitted on the first
    ``hit_count_showers`` training showers given E_inc and the energy flow's layer deposits
    (:class:`~caloforge.hit_counts.HitCountModel`, one more noise number per count), and
    keeps that many cells, those furthest above their calibrated cut (cell / cut; the
    readout threshold where no cuts are fitted), the layer keeping its energy. Needs
    ``layer_energy: deposited``. Why: calibrated cuts fix the mean number of hits, but the
    flows' hit counts fluctuate independently of the shower (ild-ecal: layer-to-layer
    count correlation 0.13-0.20 against the data's 0.47; 6-9 cells out 1.24 +- 2.91 hits
    per shower against 1.30 +- 1.38) and the classifier reads them from the sparsity, the
    widths and the radial centres (docs/convflow.md "Hits per layer"). Set after
    training;
    ``core_split``: ``calibrated`` narrows (or widens) how each layer's four central cells
    (square Cartesian layers with even sides: the 2 x 2 cells around the axis) share their
    energy, towards equal shares, by one factor per layer: the data's spread of the shares
    over the model's, fitted after everything else on ``postprocess_showers`` showers; the
    four cells keep their sum, and showers without four hits there are left as they are.
    Why: on ild-ecal the showers enter at the corner of the four central cells, and the
    flows split that core 1.5-1.9x as unevenly as the data, so the hottest cell (the
    largest share times a core energy that is right) is 3-16 % too hot
    (docs/convflow.md "What the hot core is"). Set after training;
    ``core_fraction``: ``calibrated`` maps each shower's core fraction per layer (the
    share of the layer's energy in the cells within ``core_fraction_radius`` cells of the
    axis; the first rows of cylinders; ``rings``: one map per core of radius 1, 2, ... out
    to it, each fitted after the one before; ``profile``: the whole radial profile, one map
    per ring boundary from the outside in, each moving energy only between a core and the
    next ring, so that no map rescales the share another set) to the data's distribution
    given the layer
    energy, E_inc and the share of the shower's energy before the layer, keeping the
    shower's rank
    (:class:`~caloforge.core_fraction.CoreFractionMap`, fitted on ``postprocess_showers``
    showers after the cuts, counts and spline(s), before the core split), moving energy
    between the core and the rest: the layer keeps its energy and hits. Why: on ild-ecal
    the flows' core fraction follows the shower's development too weakly, and the
    classifier reads that from the radial centres and their correlations across layers
    (docs/convflow.md "The core's share of the layer"). ``core_fraction_hits``: ``layer``:
    the maps also condition on the layer's hit count (drawn before them by ``hit_counts``,
    which does not see the profile; at fixed energy a shower with more hits is broader:
    docs/convflow.md "Hits and the radial profile"); ``parts``: on the hits of each map's
    core and of the rest of its cells (the energy follows where the hits are). Set after
    training;
    ``ring_spread``: ``calibrated`` (cylinders) maps how unevenly each ring of each layer
    shares its energy among its angular cells (the spread of the log energies of its hits)
    to the data's distribution given the ring's energy and hits, shower by shower, by one
    power of the ring's cells (:class:`~caloforge.ring_spread.RingSpreadMap`, fitted on
    ``postprocess_showers`` showers after everything before it): each ring keeps its energy
    and hits. Why: on calochallenge-3, with the rings' energies right, the flows put them
    into too few angular cells, the hottest cell 1.5-3x the data's (docs/convflow.md "The
    rings' angular spread"). Set after training.
    """

    energy: FlowConfig = field(default_factory=lambda: FlowConfig(blocks=6, hidden=[64, 64]))
    blocks: int = 6
    width: int = 16
    bins: int = 8
    bound: float = 5.0
    embedding: int = 8
    previous_layers: int = 5
    shared: bool = False
    layer_embedding: int = 4
    noise_mev: float | None = None
    threshold_mev: float | None = None
    voxel_logit_alpha: float = 1e-2
    normalise_by: str = "energy"
    logit_alpha: float = 1e-6  # the energy flow's u-space logit
    roll_augmentation: bool = True
    layers_per_step: int = 0
    position_channels: bool = False
    standardise_cells: bool = True
    cell_scale: str = "layer"
    layers: str = "all"
    postprocess: str = "none"
    postprocess_showers: int = 2000
    postprocess_energy: str = "kept"
    hit_calibration_showers: int = 0
    hit_calibration_groups: str = "hit-rate"
    hit_calibration_bins: int = 1
    layer_energy: str = "noisy"
    hit_calibration_energy: str = "layer"
    temperature: float = 1.0
    energy_steps: int = 0
    layer_hits: str = "none"
    layer_hit_showers: int = 20_000
    symmetrise: str = "none"
    hit_counts: str = "none"
    hit_count_showers: int = 5000
    core_split: str = "none"
    core_fraction: str = "none"
    core_fraction_radius: float = 2.0
    core_fraction_hits: str = "none"
    ring_spread: str = "none"
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ConvFlowConfig:
        # core_fraction_hits was a switch (true: the layer's hits) in files saved before
        values = {**values, "core_fraction_hits": hit_regressors_option(
            values.get("core_fraction_hits", "none"))}
        out = config_from_dict(cls, values, "convflow")
        if out.hit_calibration_groups not in CUT_GROUPS:
            raise OptionError(f"hit_calibration_groups must be one of {', '.join(CUT_GROUPS)}, "
                              f"got {out.hit_calibration_groups!r}")
        if out.hit_calibration_showers < 0:
            raise OptionError(f"hit_calibration_showers must be >= 0, got "
                              f"{out.hit_calibration_showers}")
        if out.hit_calibration_bins < 1:
            raise OptionError(f"hit_calibration_bins must be >= 1, got "
                              f"{out.hit_calibration_bins}")
        if out.hit_calibration_bins > 1 and out.layer_energy != "deposited":
            raise OptionError("hit_calibration_bins needs layer_energy: deposited (the bins "
                              "are of the shower's deposit)")
        if out.hit_calibration_energy not in ("layer", "group"):
            raise OptionError(f"hit_calibration_energy must be layer or group, got "
                              f"{out.hit_calibration_energy!r}")
        if out.layer_energy not in LAYER_ENERGIES:
            raise OptionError(f"layer_energy must be one of {', '.join(LAYER_ENERGIES)}, got "
                              f"{out.layer_energy!r}")
        if out.layer_energy == "deposited" and out.normalise_by == "fixed":
            raise OptionError("layer_energy: deposited needs normalise_by energy or max (a "
                              "fixed scale already sets the cells' energies)")
        if out.energy_steps < 0:
            raise OptionError(f"energy_steps must be >= 0, got {out.energy_steps}")
        if out.energy_steps and out.layer_energy != "deposited":
            raise OptionError("energy_steps needs layer_energy: deposited (the energy flow's "
                              "extra batches are drawn from the layer deposits)")
        if out.layer_hits not in LAYER_HITS:
            raise OptionError(f"layer_hits must be one of {', '.join(LAYER_HITS)}, got "
                              f"{out.layer_hits!r}")
        if out.layer_hits != "none" and out.layer_energy != "deposited":
            raise OptionError("layer_hits needs layer_energy: deposited (the boundaries are "
                              "of the layer deposits)")
        if out.layer_hit_showers < 200:
            raise OptionError(f"layer_hit_showers must be >= 200, got {out.layer_hit_showers}")
        if not 0 < out.temperature <= 2:
            raise OptionError(f"temperature must be in (0, 2], got {out.temperature}")
        if out.cell_scale not in CELL_SCALES:
            raise OptionError(f"cell_scale must be one of {', '.join(CELL_SCALES)}, got "
                              f"{out.cell_scale!r}")
        if out.postprocess not in POSTPROCESS:
            raise OptionError(f"postprocess must be one of {', '.join(POSTPROCESS)}, got "
                              f"{out.postprocess!r}")
        if out.postprocess_energy not in POSTPROCESS_ENERGIES:
            raise OptionError(f"postprocess_energy must be one of "
                              f"{', '.join(POSTPROCESS_ENERGIES)}, got "
                              f"{out.postprocess_energy!r}")
        if out.postprocess_energy == "drawn" and out.layer_energy != "deposited":
            raise OptionError("postprocess_energy: drawn needs layer_energy: deposited (the "
                              "hits are scaled to the energy flow's deposit above the "
                              "threshold)")
        if out.core_split not in CORE_SPLITS:
            raise OptionError(f"core_split must be one of {', '.join(CORE_SPLITS)}, got "
                              f"{out.core_split!r}")
        check_core_fraction_options(out.core_fraction, out.core_fraction_radius,
                                    out.core_fraction_hits)
        check_ring_spread_option(out.ring_spread)
        if out.symmetrise not in SYMMETRIES:
            raise OptionError(f"symmetrise must be one of {', '.join(SYMMETRIES)}, got "
                              f"{out.symmetrise!r}")
        check_count_options(out.hit_counts, out.hit_count_showers)
        if out.hit_counts != "none" and out.layer_energy != "deposited":
            raise OptionError("hit_counts needs layer_energy: deposited (the counts are drawn "
                              "given the layer deposits)")
        if out.hit_counts != "none" and out.hit_calibration_energy != "layer":
            raise OptionError("hit_counts keeps each layer's energy in proportion: it needs "
                              "hit_calibration_energy: layer")
        if out.normalise_by not in ("max", "energy", "fixed"):
            raise OptionError(f"normalise_by must be max, energy or fixed, got "
                              f"{out.normalise_by!r}")
        if out.previous_layers < 0 or out.layers_per_step < 0 or out.blocks < 1 \
                or out.width < 1:
            raise OptionError("previous_layers and layers_per_step must be >= 0, blocks and "
                              "width >= 1")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_config() -> ConvFlowConfig:
    """Sized for 2 CPU cores: 6 coupling blocks with 16-channel U-Nets (~0.22 M parameters
    per layer flow; single-thread sampling ~2-4 ms per 30 x 30 layer image at batch 100),
    10 random layers per step (every layer of 64 ILD showers held ~6 GB of activations),
    60 minutes of training."""
    return ConvFlowConfig(layers_per_step=10, training=TrainingConfig(
        epochs=1000, batch_size=64, learning_rate=1e-3, weight_decay=0.1, val_fraction=0.05,
        epoch_showers=5000, time_budget_s=60 * 60))


def _paper_config() -> ConvFlowConfig:
    """The published sizes (8 coupling blocks, batch 1024), for a GPU."""
    return ConvFlowConfig(blocks=8, width=32, embedding=16, training=TrainingConfig(
        epochs=200, batch_size=1024, learning_rate=1e-3, weight_decay=0.1))


def _tiny_config() -> ConvFlowConfig:
    """For tests: seconds on a CPU."""
    return ConvFlowConfig(energy=FlowConfig(blocks=2, hidden=[16]), blocks=2, width=4,
                          bins=4, embedding=4, previous_layers=2,
                          training=TrainingConfig(epochs=2, batch_size=16))


PRESETS = {"cpu": _cpu_config, "paper": _paper_config, "tiny": _tiny_config}


def _block_matmul(matrices: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Each 2x2 block of ``images`` ``(B, 1, H, W)`` times its matrix of ``matrices``
    ``(H/2, W/2, 4, 4)`` (the block's cells in :func:`squeeze`'s channel order)."""
    blocks = squeeze(images).permute(0, 2, 3, 1)[..., None]  # (B, H/2, W/2, 4, 1)
    return unsqueeze((matrices @ blocks)[..., 0].permute(0, 3, 1, 2))


def _block_whitening(second_moments: torch.Tensor, mean: torch.Tensor, floor: torch.Tensor,
                     circular: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening matrices of every 2x2 block and their inverses ``(L, H/2, W/2, 4, 4)``
    from the blocks' mean products ``(L, H/2, W/2, 4, 4)`` and the cells' means ``(L, H,
    W)``; eigenvalues floored at ``floor`` ``(L,)`` (a variance); ``circular``: the
    covariance averaged over the angle (the last image axis)."""
    layers = mean.shape[0]
    blocks = squeeze(mean[None]).reshape(layers, 4, *second_moments.shape[1:3])
    blocks = blocks.permute(0, 2, 3, 1)  # (L, H/2, W/2, 4)
    covariance = second_moments - blocks[..., :, None] * blocks[..., None, :]
    if circular:
        covariance = covariance.mean(2, keepdim=True).expand_as(covariance)
    values, vectors = torch.linalg.eigh(covariance)
    values = torch.maximum(values, floor[:, None, None, None])
    whiten = vectors @ torch.diag_embed(values.rsqrt()) @ vectors.transpose(-1, -2)
    colour = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
    return whiten, colour


def interquartile_spread(y: torch.Tensor, circular: bool = False) -> torch.Tensor:
    """Each cell's interquartile range / 1.349 (a Gaussian's standard deviation) over the
    showers of ``y`` ``(N, L, H, W)`` -> ``(L, H, W)``; ``circular``: pooled over the angle
    (the last axis), as training rolls it."""
    n, layers, h, w = y.shape
    quartiles = torch.tensor([0.25, 0.75], dtype=y.dtype, device=y.device)
    out = torch.empty(layers, h, w, dtype=y.dtype, device=y.device)
    for layer in range(layers):  # torch.quantile takes at most 2**24 values at once
        values = y[:, layer]
        if circular:
            q = torch.quantile(values.permute(1, 0, 2).reshape(h, n * w), quartiles, dim=1)
            out[layer] = ((q[1] - q[0]) / 1.349)[:, None].expand(h, w)
        else:
            q = torch.quantile(values.reshape(n, h * w), quartiles, dim=0)
            out[layer] = ((q[1] - q[0]) / 1.349).reshape(h, w)
    return out


def parse_parts(spec: str, n_layers: int) -> list[str]:
    """``"all"`` / ``"energy,0-9,12"`` -> sorted part names (``energy``, ``"0"``, ...)."""
    if spec.strip() == "all":
        return [ENERGY_PART] + [str(i) for i in range(n_layers)]
    parts: set[str] = set()
    for item in (token.strip() for token in spec.split(",")):
        if item == ENERGY_PART:
            parts.add(item)
            continue
        try:
            low, _, high = item.partition("-")
            first, last = int(low), int(high or low)
        except ValueError:
            raise OptionError(f"bad --layers item {item!r}: use energy, N or N-M") from None
        if not 0 <= first <= last < n_layers:
            raise OptionError(f"--layers {item!r}: layers are 0 .. {n_layers - 1}")
        parts.update(str(i) for i in range(first, last + 1))
    if not parts:
        raise OptionError("--layers selects nothing")
    return sorted(parts, key=lambda p: -1 if p == ENERGY_PART else int(p))


class ConvFlowModule(nn.Module):
    """The energy flow and the layer flows (one per layer, or one shared)."""

    def __init__(self, n_context: int, n_layers: int, config: ConvFlowConfig,
                 circular: bool, image_shape: tuple[int, int]) -> None:
        super().__init__()
        self.flow1 = build_maf(n_layers, n_context, config.energy)
        extra = config.layer_embedding if config.shared else 0
        positions = (1 if circular else 2) if config.position_channels else 0
        condition_channels = config.previous_layers + n_context + 1 + extra + positions

        def layer_flow() -> ConvFlow:
            return ConvFlow(condition_channels, config.blocks, config.width, config.bins,
                            config.bound, config.embedding, circular)

        self.layer_flows = nn.ModuleList([layer_flow() for _ in range(
            1 if config.shared else n_layers)])
        self.layer_embedding = nn.Embedding(n_layers, extra) if config.shared else None
        # per layer and cell in logit space (L, H, W), fitted on the training data and saved
        # with the weights; None (not in the weights) without standardise_cells
        standardise = config.standardise_cells
        self.register_buffer("cell_mean", torch.zeros(n_layers, *image_shape)
                             if standardise else None)
        self.register_buffer("cell_std", torch.ones(n_layers, *image_shape)
                             if standardise else None)
        # cell_scale: block: per layer and 2x2 block, the 4x4 whitening matrix of its cells
        # and its inverse (L, H/2, W/2, 4, 4); None (not in the weights) otherwise
        blocks = standardise and config.cell_scale == "block"
        block_shape = (n_layers, image_shape[0] // 2, image_shape[1] // 2, 4, 4)
        eye = torch.eye(4).expand(block_shape).clone()
        self.register_buffer("block_whiten", eye if blocks else None)
        self.register_buffer("block_colour", eye.clone() if blocks else None)


class ConvL2LFlow(LayerEnergyFlows):
    """Convolutional layer-to-layer flows on geometries whose layers are equal images.

    Example::

        model = ConvL2LFlow(get_geometry("ild-ecal"), ConvL2LFlow.preset("cpu"))
        model.fit(read_showers("ild_train.h5"), "runs/conv")
        generated = model.sample(reference.incident_energies, seed=1)
    """

    family = "convflow"
    config_class = ConvFlowConfig
    voxel_transform_class = MaxLogTransform
    streams_training_data = True
    log_prob_batch_size = 256
    sampling_memory_bytes = 5e8
    # activations of one layer image through a coupling stack, per cell (measured order)
    bytes_per_shower_voxel = 2e3
    max_micro_batch = 1000
    # Noise two decades under the cut, not a third of it: the inverse divides each layer by
    # the sum of all its cells, noise included. On the ILD ECAL (30 x 30 cells, cut 2.4
    # MeV) a third of the cut put ~350 MeV of noise in every layer, a generated layer
    # without a clear maximum spread its energy over that floor, and hundreds of cells
    # crossed the cut (README).
    noise_per_threshold = 1e-2

    def __init__(self, geometry: Geometry, config: ConvFlowConfig | None = None) -> None:
        config = config or _cpu_config()
        image = geometry.uniform_layer_image
        if image is None or geometry.n_layers < 2:
            shapes = sorted({layer.shape for layer in geometry.layers})
            raise GeometryError(f"convflow needs at least two layers of one shape and kind; "
                                f"{geometry.name!r} has shapes {shapes}")
        self.circular = geometry.is_cylindrical
        rows, columns = image[1]  # (n_alpha, n_radial) or (ny, nx)
        self.image_shape = (columns, rows) if self.circular else (rows, columns)
        if self.image_shape[0] % 2 or self.image_shape[1] % 2:
            raise GeometryError(f"convflow needs even layer image sides (one 2x2 squeeze); "
                                f"{geometry.name!r} layers are {self.image_shape}")
        if config.core_split != "none" and self.circular:
            raise OptionError(f"core_split needs Cartesian layers (a 2 x 2 core around the "
                              f"axis); {geometry.name!r} layers are cylinders")
        if config.symmetrise == "d4" and (self.circular
                                          or self.image_shape[0] != self.image_shape[1]):
            raise OptionError(f"symmetrise: d4 needs square Cartesian layers; {geometry.name!r} "
                              f"layers are {'cylinders' if self.circular else self.image_shape}")
        if config.ring_spread != "none" and not self.circular:
            raise OptionError(f"ring_spread needs cylindrical layers (rings of angular "
                              f"cells); {geometry.name!r} layers are Cartesian")
        if config.symmetrise == "rotations" and not self.circular:
            raise OptionError(f"symmetrise: rotations needs cylindrical layers; "
                              f"{geometry.name!r} layers are Cartesian (d4 for square ones)")
        threshold, noise = threshold_and_noise(config, geometry, self.noise_per_threshold)
        super().__init__(geometry, config, MaxLogTransform(
            noise, threshold, config.voxel_logit_alpha, normalise_by=config.normalise_by))
        self.parts = parse_parts(config.layers, geometry.n_layers)
        if config.shared and self.parts != parse_parts("all", geometry.n_layers):
            raise OptionError("a shared layer flow trains every layer at once; "
                              "--layers needs shared: false")
        self.trained_parts: list[str] = []
        self.postprocess_nodes: list[list[float]] | None = None
        # postprocess: layer-spline; None for a layer whose spectrum stays as it is
        self.layer_postprocess_nodes: list[list[list[float]] | None] | None = None
        # postprocess: group-spline; each voxel's group and each group's nodes (or None)
        self.postprocess_groups: list[int] | None = None
        self.group_postprocess_nodes: list[list[list[float]] | None] | None = None
        self.voxel_cuts_mev: list[float] | None = None  # see calibrate_hits
        # hit_calibration_bins > 1: the inner edges of the bins of E_inc (MeV) and of the
        # deposited fraction; the cuts are then bin after bin, n_voxels each
        self.voxel_cut_edges: dict[str, list[float]] | None = None
        self.hit_count_model: HitCountModel | None = None  # hit_counts; see fit_hit_counts
        self.core_split_factors: list[float] | None = None  # core_split; see fit_core_split
        self.core_fraction_maps: list[CoreFractionMap] | None = None  # see fit_core_fraction
        self.ring_spread_map: RingSpreadMap | None = None  # see fit_ring_spread
        self._energy_pool: dict[str, torch.Tensor] | None = None  # see energy_steps

    PRESETS = PRESETS

    # --- images -----------------------------------------------------------------------
    def _images(self, voxels: torch.Tensor) -> torch.Tensor:
        """``(B, n_voxels)`` -> ``(B, L, H, W)``; cylinders as (radial, angular)."""
        rows, columns = self.geometry.layers[0].shape
        images = voxels.reshape(len(voxels), self.geometry.n_layers, rows, columns)
        return images.transpose(-1, -2) if self.circular else images

    def _flat(self, image: torch.Tensor) -> torch.Tensor:
        """One layer ``(B, H, W)`` -> its cells ``(B, S)`` in the geometry's order."""
        return (image.transpose(-1, -2) if self.circular else image).flatten(1)

    def _layer_condition(self, previous: torch.Tensor, context: torch.Tensor,
                         log_energy: torch.Tensor, layer: torch.Tensor | None
                         ) -> torch.Tensor:
        """Condition images ``(B, k + C + 1 [+ e] [+ p], H, W)``: the previous k layers in
        logit space ``(B, k, H, W)`` (empty ones at the logit of zero), the conditions
        ``(B, C)`` and the standardised log layer energy ``(B,)`` as constant channels, the
        learned embedding of the layer index ``(B,)`` for a shared flow, the cell
        coordinates with ``position_channels``."""
        assert self.module is not None
        constants = [context, log_energy[:, None]]
        if self.module.layer_embedding is not None:
            constants.append(self.module.layer_embedding(layer))
        constants_t = torch.cat(constants, dim=1)[:, :, None, None]
        h, w = self.image_shape
        images = [previous, constants_t.expand(-1, -1, h, w)]
        if self.config.position_channels:
            images.append(self._positions(previous).expand(previous.shape[0], -1, -1, -1))
        return torch.cat(images, dim=1)

    def _positions(self, like: torch.Tensor) -> torch.Tensor:
        """Cell coordinates ``(1, 2, H, W)`` (Cartesian: row, column) or ``(1, 1, H, W)``
        (cylinders: radial bin), each scaled to [-1, 1] across the image."""
        h, w = self.image_shape
        rows = torch.linspace(-1.0, 1.0, h, dtype=like.dtype, device=like.device)
        if self.circular:  # images are (radial, angular)
            return rows[None, None, :, None].expand(1, 1, h, w)
        columns = torch.linspace(-1.0, 1.0, w, dtype=like.dtype, device=like.device)
        grid = torch.stack(torch.meshgrid(rows, columns, indexing="ij"))
        return grid[None]

    def _previous(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        """The k layers before ``layer`` from ``y`` ``(B, L, H, W)``, padded with empty."""
        k = self.config.previous_layers
        empty = LogitTransform(self.voxel_transform.alpha).forward(torch.zeros(()))
        start = max(0, layer - k)
        have = y[:, start:layer]
        if have.shape[1] == k:
            return have
        pad = torch.full((len(y), k - have.shape[1], *self.image_shape), float(empty),
                         dtype=y.dtype, device=y.device)
        return torch.cat([pad, have], dim=1)

    def _flow(self, layer: int) -> Any:
        assert self.module is not None
        return self.module.layer_flows[0 if self.config.shared else layer]

    def _fit_preprocessing(self, data: ShowerData) -> None:
        self._fit_threshold(data)
        self.voxel_transform.fit_scale(data.showers)
        super()._fit_preprocessing(data)

    # --- likelihood -------------------------------------------------------------------
    def _log_prob(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
                  augment: bool = False, layers_per_step: int = 0) -> torch.Tensor:
        """Log-likelihood ``(B,)`` of the parts this run trains (nats, flows' space); with
        ``layers_per_step`` k, of k random layers scaled by (layers / k)."""
        assert self.module is not None
        images = self._images(batch["voxels"])
        if augment and self.circular and self.config.roll_augmentation:
            shift = int(torch.randint(self.image_shape[1], (1,), generator=generator))
            images = torch.roll(images, shift, dims=-1)
        noisy = self.voxel_transform.add_noise(images, generator)
        energies = self._flow_layer_energies(images, noisy, generator)
        n, n_layers = energies.shape
        y = self.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape)
        context = self._context(batch)
        log_energies = self._layer_context(energies)
        log_p = torch.zeros(n, dtype=y.dtype, device=y.device)
        if ENERGY_PART in self.parts:
            x1 = self.layer_transform.forward(energies, batch["incident_energy"])
            log_p = log_p + self.module.flow1(context).log_prob(x1)
        layers = [int(p) for p in self.parts if p != ENERGY_PART]
        weight = 1.0
        if 0 < layers_per_step < len(layers):
            chosen = torch.randperm(len(layers), generator=generator)[:layers_per_step]
            weight = len(layers) / layers_per_step
            layers = [layers[i] for i in sorted(chosen.tolist())]
        if self.config.shared:  # one call over every (shower, layer) image
            index = torch.arange(n_layers, device=y.device)
            conditions = torch.cat([self._layer_condition(
                self._previous(y, i), context, log_energies[:, i], index[i].expand(n))
                for i in layers])
            images_all = torch.cat([self._standardised(y[:, i:i + 1], i) for i in layers])
            per_image = self._flow(0).log_prob(images_all, conditions)
            jacobian = sum(self._standardising_ladj(i) for i in layers)
            return log_p + weight * (per_image.reshape(len(layers), n).sum(0) + jacobian)
        for i in layers:
            condition = self._layer_condition(self._previous(y, i), context,
                                              log_energies[:, i], None)
            log_p = log_p + weight * (self._flow(i).log_prob(
                self._standardised(y[:, i:i + 1], i), condition) + self._standardising_ladj(i))
        return log_p

    def _standardised(self, image: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s image in logit space ``(B, 1, H, W)`` -> the flow's input (cell
        by cell standardised with ``standardise_cells``, else unchanged)."""
        assert self.module is not None
        if self.module.cell_mean is None:
            return image
        if self.module.block_whiten is not None:
            return _block_matmul(self.module.block_whiten[layer],
                                 image - self.module.cell_mean[layer])
        return (image - self.module.cell_mean[layer]) / self.module.cell_std[layer]

    def _unstandardised(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The inverse of :meth:`_standardised` on ``(B, H, W)``."""
        assert self.module is not None
        if self.module.cell_mean is None:
            return x
        if self.module.block_colour is not None:
            return _block_matmul(self.module.block_colour[layer], x[:, None])[:, 0] \
                + self.module.cell_mean[layer]
        return x * self.module.cell_std[layer] + self.module.cell_mean[layer]

    def _standardising_ladj(self, layer: int) -> torch.Tensor | float:
        """log|det| of :meth:`_standardised` for one image (nats)."""
        assert self.module is not None
        if self.module.cell_std is None:
            return 0.0
        if self.module.block_whiten is not None:
            return torch.linalg.slogdet(self.module.block_whiten[layer])[1].sum()
        return -torch.log(self.module.cell_std[layer]).sum()

    def _fit_cell_statistics(self, data: ShowerData, max_showers: int = 20_000,
                             chunk: int = 500, quantile_showers: int = 4000) -> None:
        """Mean and standard deviation ``(L, H, W)`` of every cell in logit space (noise on
        empty cells as in training; cylinders averaged over the angle, which training
        rolls) over the first ``max_showers`` of ``data``."""
        assert self.module is not None and self.module.cell_mean is not None
        generator = torch.Generator().manual_seed(self.config.training.seed)
        total = torch.zeros(self.geometry.n_layers, *self.image_shape, dtype=torch.float64)
        squares = torch.zeros_like(total)
        n = min(len(data), max_showers)
        robust = self.config.cell_scale == "robust"
        kept: list[torch.Tensor] = []  # the first quantile_showers images, for "robust"
        h, w = self.image_shape
        # sums of the products of the four cells of each 2x2 block (cell_scale: block)
        block_products = torch.zeros(self.geometry.n_layers, h // 2, w // 2, 4, 4,
                                     dtype=torch.float64)
        for start in range(0, n, chunk):
            images = self._images(torch.as_tensor(data.showers[start:min(start + chunk, n)],
                                                  dtype=torch.float32))
            noisy = self.voxel_transform.add_noise(images, generator)
            y = self.voxel_transform.forward(noisy.flatten(2)).reshape(noisy.shape).double()
            total += y.sum(0)
            squares += (y ** 2).sum(0)
            if self.module.block_whiten is not None:
                blocks = squeeze(y)  # (n, 4L, H/2, W/2): layer-major, 4 cells each
                blocks = blocks.reshape(len(y), -1, 4, h // 2, w // 2)
                block_products += torch.einsum("nlihw,nljhw->lhwij", blocks, blocks)
            if robust and start < quantile_showers:
                kept.append(y[:quantile_showers - start].float())
        if self.circular:
            total = total.mean(-1, keepdim=True).expand_as(total)
            squares = squares.mean(-1, keepdim=True).expand_as(squares)
        mean = total / max(n, 1)
        variance = (squares / max(n, 1) - mean ** 2).clamp(min=0)
        # one scale per layer (the cells' pooled spread) by default, not one per cell: a cell
        # the core only sometimes reaches has a small spread, and dividing by it made those
        # showers atypical to the flow; cell_scale: cell floors each cell's at half of it
        pooled = variance.mean(dim=(1, 2), keepdim=True).sqrt().clamp(min=0.05)
        std = pooled.expand_as(mean)
        if self.config.cell_scale == "cell":
            std = torch.maximum(variance.sqrt(), 0.5 * pooled)
        elif robust:
            # a cell empty in a minority of showers (the ILD core in the first and last
            # layers) has a standard deviation set by the gap between empty and hit, wider
            # than its hits' spread; the interquartile range then measures the hits
            iqr = interquartile_spread(torch.cat(kept), circular=self.circular)
            std = torch.maximum(torch.minimum(variance.sqrt(), iqr.double()), 0.5 * pooled)
        self.module.cell_mean.copy_(mean.float())
        self.module.cell_std.copy_(std.float())
        if self.module.block_whiten is not None:
            whiten, colour = _block_whitening(block_products / max(n, 1), mean,
                                              (0.5 * pooled[:, 0, 0]) ** 2, self.circular)
            self.module.block_whiten.copy_(whiten.float())
            self.module.block_colour.copy_(colour.float())

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Mean negative log-likelihood per shower of the trained parts (nats)."""
        return -self._log_prob(batch, generator, augment=True,
                               layers_per_step=self.config.layers_per_step).mean()

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                        ) -> torch.Tensor:
        """The same over every layer, without augmentation."""
        return -self._log_prob(batch, generator).mean()

    def validation_batch_size(self, training_batch_size: int) -> int:
        return training_batch_size

    # --- the energy flow's own steps (``energy_steps``) --------------------------------
    @property
    def _extra_energy_steps(self) -> int:
        return self.config.energy_steps if ENERGY_PART in self.parts else 0

    def players(self) -> dict[str, Player]:
        """One optimiser over every parameter, or (``energy_steps``) one for the voxel
        flows and one for the energy flow."""
        if not self._extra_energy_steps:
            return super().players()
        assert self.module is not None
        energy = list(self.module.flow1.parameters())
        ids = {id(p) for p in energy}
        rest = [p for p in self.module.parameters() if id(p) not in ids]
        return {"model": (rest, 1.0, DEFAULT_BETAS), ENERGY_PLAYER: (energy, 1.0, DEFAULT_BETAS)}

    def player_schedule(self, step: int) -> tuple[str, ...]:
        return ("model",) + (ENERGY_PLAYER,) * self._extra_energy_steps

    def player_loss(self, name: str, batch: dict[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        """``model``: :meth:`loss` (its energy term reaches no optimiser when the energy
        flow has its own); ``energy``: the energy flow's mean negative log-likelihood on as
        many showers as ``batch`` holds, drawn at random from the training showers."""
        if name != ENERGY_PLAYER:
            return self.loss(batch, generator)
        assert self.module is not None and self._energy_pool is not None
        pool = self._energy_pool
        index = torch.randint(len(pool["deposits"]), (len(batch["incident_energy"]),),
                              generator=generator)
        drawn = {key: value[index.to(value.device)] for key, value in pool.items()}
        deposits = drawn.pop("deposits")
        energies = deposits + self.deposit_floor_mev * uniform_noise(deposits, generator)
        x1 = self.layer_transform.forward(energies, drawn["incident_energy"])
        return -self.module.flow1(self._context(drawn)).log_prob(x1).mean()

    def _fill_energy_pool(self, train: ShowerData, device: str) -> None:
        """The training showers' layer deposits ``(N, L)`` MeV, E_inc and conditions on
        ``device``: what the energy flow's own steps draw from."""
        self._energy_pool = None
        if not self._extra_energy_steps:
            return
        pool = {"deposits": torch.as_tensor(
            self.geometry.layer_energies(train.showers, dtype=np.float64), dtype=torch.float32),
            "incident_energy": torch.as_tensor(train.incident_energies, dtype=torch.float32)}
        for name in self.conditions.names:
            pool[f"condition.{name}"] = torch.as_tensor(train.conditions[name],
                                                        dtype=torch.float32)
        self._energy_pool = {key: value.to(device) for key, value in pool.items()}

    def _new_module(self) -> ConvFlowModule:
        return ConvFlowModule(self.conditions.n_features, self.geometry.n_layers, self.config,
                              self.circular, self.image_shape)

    def prepare_fit(self, train: ShowerData, resume: bool, device: str) -> None:
        whole_model = [name for name, wanted in (
            (f"postprocess: {self.config.postprocess}", self.config.postprocess != "none"),
            ("hit_calibration_showers", self.config.hit_calibration_showers > 0),
            (f"hit_counts: {self.config.hit_counts}", self.config.hit_counts != "none"),
            (f"core_split: {self.config.core_split}", self.config.core_split != "none"),
            (f"core_fraction: {self.config.core_fraction}",
             self.config.core_fraction != "none"),
            (f"layer_hits: {self.config.layer_hits}", self.config.layer_hits != "none"),
            (f"ring_spread: {self.config.ring_spread}", self.config.ring_spread != "none"))
            if wanted]
        if whole_model and len(self.parts) < self.geometry.n_layers + 1:
            raise OptionError(f"{whole_model[0]} needs every part in one run (it samples "
                              f"the whole model); train without --layers")
        super().prepare_fit(train, resume, device)
        if not resume and self.config.standardise_cells:
            self._fit_cell_statistics(train)
        self._fill_energy_pool(train, device)

    def end_fit(self, data: ShowerData | ShowerStream, run_dir: str) -> None:
        """Mark the parts trained; calibrate the hit cuts, then fit the spline
        post-processing, on the first training showers (each where configured)."""
        self.trained_parts = list(self.parts)
        self._energy_pool = None
        config = self.config
        spline = config.postprocess != "none"
        counts = config.hit_counts != "none"
        core = config.core_split != "none"
        fraction = config.core_fraction != "none"
        hits = config.layer_hits != "none"
        spread = config.ring_spread != "none"
        self.layer_hit_map = None
        if not (spline or config.hit_calibration_showers or counts or core or fraction
                or hits or spread):
            return
        after = spline or core or fraction or spread
        if hits:  # first: everything after samples the calibrated layer energies
            self.fit_layer_hits(data, config.layer_hit_showers,
                                empty_mev=0.5 * self.deposit_floor_mev)
        reference = first_showers(data, max(config.hit_calibration_showers,
                                            config.postprocess_showers if after else 0,
                                            config.hit_count_showers if counts else 0))
        if config.hit_calibration_showers:
            self.calibrate_hits(reference.select(slice(0, config.hit_calibration_showers)))
        if counts:
            self.fit_hit_counts(reference.select(slice(0, config.hit_count_showers)))
        if spline:
            self.fit_postprocess(reference.select(slice(0, config.postprocess_showers)))
        late = reference.select(slice(0, config.postprocess_showers))
        mapped = self.fit_core_fraction(late) if fraction else None
        if spread:
            mapped = self.fit_ring_spread(late, generated=mapped)
        if core:
            self.fit_core_split(late, generated=mapped)

    # --- the layer energies the flows learn (``layer_energy``) -------------------------
    @property
    def deposit_floor_mev(self) -> float:
        """``layer_energy: deposited``: empty layers' energies are dequantised by U(0, this)
        MeV, below any hit (sampled deposits under the threshold give empty layers)."""
        return 0.1 * self.voxel_transform.threshold_mev

    def _flow_layer_energies(self, images: torch.Tensor, noisy: torch.Tensor,
                             generator: torch.Generator | None) -> torch.Tensor:
        """Layer energies ``(B, L)`` MeV the energy flow learns: the sums of the noisy
        images ``(B, L, H, W)`` or the deposits of the images, dequantised."""
        if self.config.layer_energy == "noisy":
            return noisy.sum(dim=(-2, -1))
        deposits = images.sum(dim=(-2, -1))
        return deposits + self.deposit_floor_mev * uniform_noise(deposits, generator)

    def _expected_layer_offset_mev(self) -> np.ndarray:
        if self.config.layer_energy == "noisy":
            return super()._expected_layer_offset_mev()
        return np.full(self.geometry.n_layers, 0.5 * self.deposit_floor_mev)

    def _cells(self, y: torch.Tensor, layer_energies: torch.Tensor) -> torch.Tensor:
        """One layer's cells ``(B, H * W)`` MeV (image order) from its logit values and the
        energy flow's layer energies ``(B,)`` MeV; with a hit count model (``hit_counts``)
        the cells under the readout threshold keep their values (candidate hits)."""
        if self.config.layer_energy == "deposited":
            return self.voxel_transform.inverse_deposited(y, layer_energies,
                                                          keep_below=self._counts_hits)
        return self.voxel_transform.inverse(y, layer_energies)

    @property
    def _counts_hits(self) -> bool:
        return self.hit_count_model is not None and self.config.hit_counts != "none"

    # --- hit/no-hit calibration --------------------------------------------------------
    def calibrate_hits(self, reference: ShowerData, seed: int = 3) -> None:
        """Set one cut per group of cells (MeV, >= the readout threshold) so that the
        model, sampling ``reference``'s conditions, makes no more hits in each group than
        ``reference`` has (:func:`~caloforge.preprocessing.group_occupancy_cuts`).

        Why: the flows leave a gap between empty cells (noise under the cut) and faint
        deposits; with the noise just under the cut they fill the halo but also cross the
        cut far from the axis, and one cut per layer cannot tell the two apart
        (docs/convflow.md "The halo"). Cells cut go empty; the layer keeps its energy above
        the readout threshold (:meth:`~caloforge.preprocessing.VoxelTransform.cut_voxels`).
        With ``hit_calibration_bins`` k > 1, cuts per bin of E_inc and of the deposited
        fraction (``reference``'s quantiles; the model's showers by their energy flow's
        deposit, which their hits carry before any cut). The hit count model
        (``hit_counts``) is cleared: it picks among the cells these cuts leave."""
        self.voxel_cuts_mev = self.postprocess_nodes = self.layer_postprocess_nodes = None
        self.postprocess_groups = self.group_postprocess_nodes = None
        self.voxel_cut_edges = self.hit_count_model = self.core_split_factors = None
        self.core_fraction_maps = self.ring_spread_map = None
        generated = self._sample_in_flow_frame(reference, seed)
        groups = self._cut_groups(reference.showers)
        threshold = self.voxel_transform.threshold_mev
        real = np.where(reference.showers >= threshold, reference.showers, 0)
        k = self.config.hit_calibration_bins
        energies = np.asarray(reference.incident_energies, dtype=np.float64).reshape(-1)
        fractions = real.sum(1, dtype=np.float64) / energies
        levels = np.arange(1, k) / k
        edges = {"incident_energy_mev": np.quantile(energies, levels).tolist(),
                 "deposit_fraction": np.quantile(fractions, levels).tolist()}

        def bins(deposits: np.ndarray) -> np.ndarray:
            return (np.digitize(energies, edges["incident_energy_mev"]) * k
                    + np.digitize(deposits / energies, edges["deposit_fraction"]))

        real_bins, fake_bins = bins(real.sum(1, dtype=np.float64)), bins(
            generated.sum(1, dtype=np.float64))
        cuts = []
        for b in range(k * k):
            group_cuts = group_occupancy_cuts(real[real_bins == b], generated[fake_bins == b],
                                              groups, threshold)
            cuts += [float(c) for c in group_cuts[groups]]
        self.voxel_cuts_mev = cuts
        if k > 1:
            self.voxel_cut_edges = {name: [float(e) for e in values]
                                    for name, values in edges.items()}

    def fit_hit_counts(self, reference: ShowerData) -> None:
        """Fit the hit count model (``hit_counts``) on ``reference``'s hits per layer (or
        band of a layer), layer deposits (cells at or above the readout threshold) and
        incident energies."""
        self.hit_count_model = fit_layer_counts(
            reference.showers.reshape(len(reference), self.geometry.n_layers, -1),
            reference.incident_energies, self._count_bands(),
            self.voxel_transform.threshold_mev)

    @property
    def n_hit_counts(self) -> int:
        """The counts drawn per shower (``hit_counts``): layers x bands, or 0."""
        if self.config.hit_counts == "none":
            return 0
        return self.geometry.n_layers * (int(self._count_bands().max()) + 1)

    def _count_bands(self) -> np.ndarray:
        """Each cell's count band ``(S,)`` in the geometry's cell order (``hit_counts:
        band``, else all 0; :func:`~caloforge.hit_counts.count_bands`)."""
        return count_bands(self.geometry, self.config.hit_counts)

    def _hit_counts(self, incident_energies: torch.Tensor, layer_energies: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor | None:
        """Each shower's hits per layer (and band) ``(B, L x n_bands)`` drawn from ``noise``
        of that shape given E_inc ``(B,)`` MeV and the energy flow's layer deposits
        ``(B, L)`` MeV; None without a fitted count model."""
        if not self._counts_hits:
            return None
        assert self.hit_count_model is not None
        return self.hit_count_model.draw(incident_energies, layer_energies, noise,
                                         max_count=self.voxels_per_pass)

    def _counted(self, cells: torch.Tensor, cuts: torch.Tensor, counts: torch.Tensor
                 ) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV (those under the readout threshold with their
        values, see :meth:`_cells`) with ``counts`` ``(B, n_bands)`` hits in each band,
        ranked by cell / cut (:func:`~caloforge.hit_counts.counted_cells`). Where the flows
        drew fewer hits in a band than the count (ild-ecal: 2-9 cells out in the last
        layers, 0.6-0.8x the data's hits), its highest faint cells become hits."""
        return counted_cells(cells, cuts, counts, self._count_bands(),
                             self.voxel_transform.threshold_mev)

    def _cut_groups(self, showers: np.ndarray, split_blocks: bool = True) -> np.ndarray:
        """Each voxel's calibration group ``(n_voxels,)`` (``hit_calibration_groups``);
        ``split_blocks=False``: a ``-block`` grouping without its split (the spectrum maps
        of ``group-spline``: 8 times fewer hits each would leave most far groups unmapped,
        their hits 1.5x the data's energy on ild-ecal)."""
        n_layers, size = self.geometry.n_layers, self.voxels_per_pass
        layers = np.repeat(np.arange(n_layers), size)
        kind = self.config.hit_calibration_groups
        if kind == "layer":
            return layers
        if kind.startswith("hit-rate"):
            groups = hit_rate_groups(showers, [size] * n_layers)
        else:
            h, w = self.image_shape
            rows, columns = np.mgrid[0:h, 0:w]
            rings = rows if self.circular else np.floor(np.hypot(
                rows - (h - 1) / 2, columns - (w - 1) / 2)).astype(int)
            rings = self._flat(torch.as_tensor(rings)[None])[0].numpy()
            groups = layers * (int(rings.max()) + 1) + np.tile(rings, n_layers)
        if not (kind.endswith("-block") and split_blocks):
            return groups
        places = self._flat(torch.as_tensor(self._block_places())[None])[0].numpy()
        return groups * 8 + np.tile(places, n_layers)

    def _block_places(self) -> np.ndarray:
        """``(H, W)``: each image cell's place in its 2 x 2 squeeze block, 0..3 (the channel
        of :func:`~caloforge.models.flows.conv_blocks.squeeze`), plus 4 where the block lies
        on the image's zero-padded border (cylinders: the first and last radial blocks).
        Why: the flows' convolutions see the squeezed image, and on ild-ecal they put
        2.2-2.6x the data's hits into the outermost blocks (docs/convflow.md "The halo's
        hit pattern")."""
        h, w = self.image_shape
        rows, columns = np.mgrid[0:h, 0:w]
        border = (rows < 2) | (rows >= h - 2)
        if not self.circular:
            border |= (columns < 2) | (columns >= w - 2)
        return (rows % 2) * 2 + columns % 2 + 4 * border

    def _cut_calibrated(self, cells: torch.Tensor, layer: int, incident_energies: torch.Tensor,
                        deposits: torch.Tensor, counts: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV (already cut at the readout threshold; with
        ``counts``, see :meth:`_cells`) under the calibrated cuts (where fitted; with
        ``hit_calibration_bins``, those of each shower's bin of E_inc ``(B,)`` MeV and of
        its total deposit ``(B,)`` MeV over it) or, given hit ``counts`` ``(B, n_bands)``
        (``hit_counts``), that many cells of each band furthest above them
        (:meth:`_counted`); the layer kept at its energy above the threshold.

        Not at the flows' layer energy: that includes the dequantisation noise of the empty
        cells (with the noise band, 0.9 x the cut, ~30 MeV per ILD layer), which the
        readout threshold has already removed and must not come back as signal."""
        if self.voxel_cuts_mev is None:
            if counts is None:
                return cells
            return self._counted(cells, torch.full(
                cells.shape[1:], self.voxel_transform.threshold_mev, dtype=cells.dtype,
                device=cells.device), counts)
        size, n_voxels = cells.shape[1], self.geometry.n_voxels
        bins = len(self.voxel_cuts_mev) // n_voxels
        cuts = torch.tensor([self.voxel_cuts_mev[b * n_voxels + layer * size:
                                                 b * n_voxels + (layer + 1) * size]
                             for b in range(bins)], dtype=cells.dtype, device=cells.device)
        if self.voxel_cut_edges is None:
            cuts = cuts[0]
        else:  # each shower's bin (as np.digitize: the number of edges <= the value)
            def bin_of(values: torch.Tensor, name: str) -> torch.Tensor:
                assert self.voxel_cut_edges is not None
                edges = torch.tensor(self.voxel_cut_edges[name], dtype=values.dtype,
                                     device=values.device)
                return (values[:, None] >= edges).sum(1)

            k = len(self.voxel_cut_edges["incident_energy_mev"]) + 1
            energies = incident_energies.to(deposits.dtype)
            cuts = cuts[bin_of(energies, "incident_energy_mev") * k
                        + bin_of(deposits / energies, "deposit_fraction")]  # (B, S)
        if counts is not None:
            return self._counted(cells, cuts, counts)
        groups = None
        if self.config.hit_calibration_energy == "group":
            # the calibration groups of this layer are its cells sharing one cut value
            # (numpy: a constant, also in an exported graph)
            _, group = np.unique(self.voxel_cuts_mev[layer * size:(layer + 1) * size],
                                 return_inverse=True)
            groups = torch.as_tensor(np.eye(int(group.max()) + 1)[group.ravel()],
                                     dtype=cells.dtype, device=cells.device)
        return VoxelTransform(layer_sizes=[size]).cut_voxels(cells, cuts, groups)

    def on_best(self, run_dir: str, state: Any) -> None:
        self.trained_parts = list(self.parts)
        super().on_best(run_dir, state)

    # --- sampling ---------------------------------------------------------------------
    @property
    def voxels_per_pass(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def _require_complete(self) -> None:
        missing = [p for p in parse_parts("all", self.geometry.n_layers)
                   if p not in self.trained_parts]
        if missing:
            raise CaloforgeError(
                f"this convflow model has untrained parts ({', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}); train them with --layers and join "
                f"the runs with `caloforge merge`")

    def sample(self, incident_energies: np.ndarray, conditions: dict[str, np.ndarray] | None = None,
               seed: int = 0, shard: int = 0, batch_size: int = 10_000, device: str = "cpu",
               ) -> ShowerData:
        energies, conditions = self._sampling_inputs(incident_energies, conditions)
        self._require_complete()
        self._require_symmetric_conditions()
        n, n_layers = len(energies), self.geometry.n_layers
        size = self.voxels_per_pass
        h, w = self.image_shape
        k = self.config.previous_layers
        out = np.empty((n, n_layers * size), dtype=np.float32)
        with torch.inference_mode():
            spans, contexts, generator, layer_energies, log_energies = \
                self._start_layer_sampling(energies, conditions, seed, shard, batch_size, device)
            e_inc = torch.as_tensor(energies, dtype=layer_energies.dtype, device=device)
            # the last k generated layers in logit space, oldest first
            recent = torch.empty(n, 0, h, w, device=device)
            for layer in range(n_layers):
                # one draw per layer for the whole shard: independent of the batch size
                z = self.config.temperature * torch.randn(n, 4, h // 2, w // 2,
                                                          generator=generator)
                index = torch.full((n,), layer, device=device)
                generated = []
                for (a, b), context in zip(spans, contexts):
                    previous = self._previous(recent[a:b], recent.shape[1])
                    condition = self._layer_condition(previous, context,
                                                      log_energies[a:b, layer], index[a:b])
                    x = self._flow(layer).inverse(z[a:b].to(device), condition)[:, 0]
                    generated.append(finite_logits(self._unstandardised(x, layer)))
                y = torch.cat(generated)
                cells = self._cells(y.reshape(n, -1), layer_energies[:, layer])
                out[:, layer * size:(layer + 1) * size] = \
                    self._flat(cells.reshape(n, h, w)).cpu().numpy()
                recent = torch.cat([recent, y[:, None]], dim=1)[:, -k:] if k else recent
            # the draws after the layers' (the order of draw_noise), then each layer's cuts,
            # spline and symmetry
            counts = bits = None
            if self.config.hit_counts != "none":
                counts = self._hit_counts(e_inc, layer_energies, torch.randn(
                    n, self.n_hit_counts, generator=generator).to(device, layer_energies.dtype))
            if self.config.symmetrise != "none":
                bits = torch.randn(n, SYMMETRY_BITS, generator=generator).to(device)
            for layer in range(n_layers):
                cells = torch.from_numpy(out[:, layer * size:(layer + 1) * size]).to(device)
                out[:, layer * size:(layer + 1) * size] = self._finished_layer(
                    cells, layer, e_inc, layer_energies, counts, bits).cpu().numpy()
        return self._sampled_data(energies, out, conditions)

    def _finished_layer(self, cells: torch.Tensor, layer: int, incident_energies: torch.Tensor,
                        layer_energies: torch.Tensor, counts: torch.Tensor | None,
                        bits: torch.Tensor | None) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV as the flows drew them (:meth:`_cells`) through
        the hit cuts or counts (``counts`` ``(B, L x n_bands)``), the spline(s) and the
        symmetry (``bits`` ``(B, 3)``), each where the model has it."""
        if counts is not None:
            n_bands = counts.shape[1] // self.geometry.n_layers
            counts = counts[:, layer * n_bands:(layer + 1) * n_bands]
        cells = self._cut_calibrated(cells, layer, incident_energies, layer_energies.sum(1),
                                     counts)
        mapped = self._postprocess(cells, layer)
        if self.config.postprocess_energy == "restored":
            before, after = cells.sum(1), mapped.sum(1)
            scale = torch.where(after > 0, before / after.clamp(min=torch.finfo(after.dtype).tiny),
                                torch.zeros_like(after))
            mapped = mapped * scale[:, None]
            mapped = torch.where(mapped > 0, mapped.clamp(
                min=lowest_hit(self.voxel_transform.threshold_mev)), mapped)
        elif self.config.postprocess_energy == "drawn":
            mapped = rescale_hits(mapped, layer_energies[:, layer].to(mapped.dtype),
                                  lowest_hit(self.voxel_transform.threshold_mev))
        if self.config.core_fraction != "none":
            mapped = apply_core_fraction_maps(self.core_fraction_maps or [], mapped, layer,
                                              incident_energies, layer_energies)
        if self.config.ring_spread != "none" and self.ring_spread_map is not None:
            mapped = self.ring_spread_map.apply(mapped, layer)
        cells = self._split_core(mapped, layer)
        return cells if bits is None else self._symmetrised(cells, bits)

    def _sample_in_flow_frame(self, reference: ShowerData, seed: int) -> np.ndarray:
        """Showers ``(N, n_voxels)`` MeV for ``reference``'s conditions as the flows draw
        them, not turned by ``symmetrise``: the cuts and splines fitted on them act before
        the symmetry does."""
        symmetrise, self.config.symmetrise = self.config.symmetrise, "none"
        try:
            return self.sample(reference.incident_energies, reference.conditions,
                               seed=seed).showers
        finally:
            self.config.symmetrise = symmetrise

    def _require_symmetric_conditions(self) -> None:
        if self.config.symmetrise != "none" and self.conditions.names:
            raise OptionError(f"symmetrise: {self.config.symmetrise} needs showers that depend "
                              f"on the incident energy alone; this model is also conditioned on "
                              f"{', '.join(self.conditions.names)}")

    def _symmetrised(self, cells: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """One layer's cells ``(B, H * W)`` turned by each shower's symmetry of the square:
        flipped in x where ``bits[:, 0] > 0``, in y where ``bits[:, 1] > 0``, then
        transposed where ``bits[:, 2] > 0`` (``bits`` ``(B, 3)``, standard normal: each of
        the 8 elements with probability 1/8); of the cylinder (``rotations``): see
        :meth:`_rotated`. Torch operations only (exported)."""
        if self.config.symmetrise == "rotations":
            return self._rotated(cells, bits)
        h, w = self.image_shape
        image = cells.reshape(-1, h, w)
        image = torch.where(bits[:, 0, None, None] > 0, image.flip(-1), image)
        image = torch.where(bits[:, 1, None, None] > 0, image.flip(-2), image)
        image = torch.where(bits[:, 2, None, None] > 0, image.transpose(-1, -2), image)
        return image.reshape(-1, h * w)

    def _rotated(self, cells: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """One cylindrical layer's cells ``(B, n_alpha * n_radial)`` (angular bin-major)
        reflected in the angle (bin ``i`` -> ``n_alpha - 1 - i``: the bins are symmetric
        about alpha = 0) where ``bits[:, 0] > 0``, then turned by ``k`` angular bins, ``k =
        floor(Phi(bits[:, 1]) n_alpha)`` uniform over the ``n_alpha`` steps (``Phi`` the
        standard normal CDF)."""
        n_radial, n_alpha = self.image_shape
        image = cells.reshape(-1, n_alpha, n_radial)
        image = torch.where(bits[:, 0, None, None] > 0, image.flip(-2), image)
        uniform = 0.5 * (1 + torch.erf(bits[:, 1] / math.sqrt(2)))
        steps = (uniform * n_alpha).floor().clamp(max=n_alpha - 1).to(torch.long)  # (B,)
        source = (torch.arange(n_alpha, device=cells.device)[None] + steps[:, None]) % n_alpha
        image = image.gather(1, source[:, :, None].expand(-1, -1, n_radial))
        return image.reshape(-1, n_alpha * n_radial)

    def noise_features(self) -> int:
        h, w = self.image_shape
        bits = SYMMETRY_BITS if self.config.symmetrise != "none" else 0
        return self.geometry.n_layers * (1 + h * w) + self.n_hit_counts + bits

    def draw_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The energy flow's noise ``(n, L)``, then each layer's ``(n, 4 * H/2 * W/2)`` in
        order, then (``hit_counts``) the counts' ``(n, L x n_bands)``, then (``symmetrise``) the
        symmetry's ``(n, 3)``: the draws :meth:`sample` makes (which draws layer by layer
        instead of all at once, to hold one layer's noise at a time)."""
        h, w = self.image_shape
        draws = [torch.randn(n, self.geometry.n_layers, generator=generator)]
        draws += [torch.randn(n, 4, h // 2, w // 2, generator=generator).flatten(1)
                  for _ in range(self.geometry.n_layers)]
        if self.config.hit_counts != "none":
            draws.append(torch.randn(n, self.n_hit_counts, generator=generator))
        if self.config.symmetrise != "none":
            draws.append(torch.randn(n, SYMMETRY_BITS, generator=generator))
        return torch.cat(draws, dim=1)

    layer_steps = True

    def _layer_step_state(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """(k > 0) the k layers before the first, empty ``(B, k, H, W)`` in logit space."""
        self._require_complete()
        self._require_symmetric_conditions()
        k, (h, w) = self.config.previous_layers, self.image_shape
        if not k:
            return {}
        empty = float(LogitTransform(self.voxel_transform.alpha).forward(torch.zeros(())))
        return {"recent": torch.zeros_like(noise[:, :1, None, None]).expand(-1, k, h, w)
                + empty}

    def _layer_noise_step(self, step: int, noise: torch.Tensor,
                          state: dict[str, torch.Tensor]
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``step``'s cells ``(B, H * W)`` MeV from its noise and the k layers before
        it (oldest first; updated to end with this one)."""
        n_layers, (h, w) = self.geometry.n_layers, self.image_shape
        k, size = self.config.previous_layers, h * w
        z = self.config.temperature * noise[:, n_layers + step * size:
                                            n_layers + (step + 1) * size]
        log_energies = state["log_energies"]
        index = torch.zeros_like(log_energies[:, 0], dtype=torch.long) + step
        recent = state["recent"] if k else noise[:, :0, None, None].expand(-1, 0, h, w)
        condition = self._layer_condition(recent, state["context"], log_energies[:, step],
                                          index)
        y = finite_logits(self._unstandardised(self._flow(step).inverse(
            z.reshape(-1, 4, h // 2, w // 2), condition)[:, 0], step))
        image = self._cells(y.flatten(1), state["layer_energies"][:, step])
        counts = None
        if self.config.hit_counts != "none":
            start = n_layers * (1 + size)
            counts = self._hit_counts(state["incident_energy"], state["layer_energies"],
                                      noise[:, start:start + self.n_hit_counts])
        bits = noise[:, -SYMMETRY_BITS:] if self.config.symmetrise != "none" else None
        cells = self._finished_layer(self._flat(image.reshape(-1, h, w)), step,
                                     state["incident_energy"], state["layer_energies"],
                                     counts, bits)
        if not k:
            return cells, {}
        return cells, {"recent": torch.cat([recent[:, 1:], y[:, None]], dim=1)}

    # --- post-processing --------------------------------------------------------------
    def fit_postprocess(self, reference: ShowerData, nodes: int = 128, seed: int = 1) -> None:
        """Fit the monotone map (PCHIP in log10 MeV through ``nodes`` quantiles) from the
        cell energies this model generates for ``reference``'s conditions to
        ``reference``'s own cell energies (cells above threshold only): one for all layers
        (``postprocess: spline``), one per layer (``layer-spline``, ``nodes // 2``
        quantiles; a layer with fewer hits than that in either keeps its spectrum) or one
        per calibration group (``group-spline``, ``nodes // 4`` quantiles; likewise)."""
        self.postprocess_nodes = self.layer_postprocess_nodes = None
        self.postprocess_groups = self.group_postprocess_nodes = None
        # these act after the spline(s): refitted after them
        self.core_split_factors = self.core_fraction_maps = self.ring_spread_map = None
        generated = self._sample_in_flow_frame(reference, seed)
        if self.config.postprocess == "group-spline":
            groups = self._cut_groups(reference.showers, split_blocks=False)
            self.group_postprocess_nodes = group_quantile_map_nodes(
                reference.showers, generated, groups, nodes // 4)
            self.postprocess_groups = [int(g) for g in groups]
            return
        if self.config.postprocess != "layer-spline":
            self.postprocess_nodes = quantile_map_nodes(reference.showers, generated,
                                                        nodes)
            return
        self.layer_postprocess_nodes = layer_quantile_map_nodes(
            reference.showers, generated, [self.voxels_per_pass] * self.geometry.n_layers,
            nodes // 2)

    def _postprocess(self, cells: torch.Tensor, layer: int) -> torch.Tensor:
        """Apply the fitted spline(s) to ``layer``'s cells above threshold ``(B, S)`` MeV
        (identity without one); the ends extrapolate linearly in log10."""
        if self.group_postprocess_nodes is not None and self.postprocess_groups is not None:
            return self._group_postprocess(cells, layer)
        nodes = self.postprocess_nodes
        if self.layer_postprocess_nodes is not None:
            nodes = self.layer_postprocess_nodes[layer]
        if nodes is None:
            return cells
        x, y = nodes
        return monotone_log_map(cells, x, y)

    def _group_postprocess(self, cells: torch.Tensor, layer: int) -> torch.Tensor:
        """``group-spline``: each calibration group's cells of ``layer`` ``(B, S)`` MeV
        through its own map; hits stay hits (at least the readout threshold)."""
        assert self.group_postprocess_nodes is not None and self.postprocess_groups is not None
        size = cells.shape[1]
        groups = np.asarray(self.postprocess_groups[layer * size:(layer + 1) * size])
        threshold = self.voxel_transform.threshold_mev
        out = cells.clone()
        for group in np.unique(groups):
            nodes = self.group_postprocess_nodes[int(group)]
            if nodes is None:
                continue
            index = torch.as_tensor(np.flatnonzero(groups == group), device=cells.device)
            members = cells[:, index]
            mapped = monotone_log_map(members, *nodes)
            out[:, index] = torch.where(members > 0, mapped.clamp(min=lowest_hit(threshold)),
                                        members)
        return out

    # --- the core's share of each layer (``core_fraction``) -----------------------------
    def _core_fraction_cells(self) -> np.ndarray:
        """The voxel indices within a layer of the cells within ``core_fraction_radius``
        cells of the axis (:func:`~caloforge.core_fraction.core_cells`)."""
        return core_cells(self.geometry, self.config.core_fraction_radius)

    def fit_core_fraction(self, reference: ShowerData, seed: int = 4) -> np.ndarray:
        """``core_fraction``: fit the per-layer map(s) of the core fraction from the model's
        showers for ``reference``'s conditions (everything before them applied) to
        ``reference``'s (:func:`~caloforge.core_fraction.fit_option_maps`); clears the core
        split, which acts after them. Returns those showers ``(N, n_voxels)`` MeV with the
        maps applied: what the core split is fitted on next (no second sampling)."""
        self.core_fraction_maps = self.core_split_factors = self.ring_spread_map = None
        n_layers = self.geometry.n_layers
        generated = self._sample_in_flow_frame(reference, seed)
        self.core_fraction_maps, mapped = fit_option_maps(
            self.geometry, self.config.core_fraction, self.config.core_fraction_radius,
            reference.showers.reshape(len(reference), n_layers, -1),
            reference.incident_energies, generated.reshape(len(generated), n_layers, -1),
            reference.incident_energies, self.voxel_transform.threshold_mev,
            hit_regressors=self.config.core_fraction_hits)
        return mapped.reshape(len(generated), -1)

    # --- the rings' angular spread (``ring_spread``) -----------------------------------
    def fit_ring_spread(self, reference: ShowerData, seed: int = 5,
                        generated: np.ndarray | None = None) -> np.ndarray:
        """``ring_spread``: fit the map of each ring's angular spread from the model's
        showers for ``reference``'s conditions with everything before it applied (or
        ``generated`` ``(N, n_voxels)`` MeV, such a sample) to ``reference``'s
        (:func:`~caloforge.ring_spread.fit_ring_spread`). Returns those showers with the
        map applied ``(N, n_voxels)`` MeV."""
        self.ring_spread_map = None
        if generated is None:
            generated = self._sample_in_flow_frame(reference, seed)
        n_layers = self.geometry.n_layers
        self.ring_spread_map, mapped = fit_ring_spread(
            self.geometry, reference.showers.reshape(len(reference), n_layers, -1),
            generated.reshape(len(generated), n_layers, -1), self.voxel_transform.threshold_mev)
        return mapped.reshape(len(generated), -1)

    # --- the core's split (``core_split``) ---------------------------------------------
    def _core_cells(self) -> np.ndarray:
        """The voxel indices within a layer ``(4,)`` of the 2 x 2 cells around the image's
        centre."""
        h, w = self.image_shape
        image = np.zeros((h, w), dtype=np.int64)
        image[h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = 1
        flat = self._flat(torch.as_tensor(image)[None])[0].numpy()
        return np.flatnonzero(flat)

    def _core_share_deviations(self, showers: np.ndarray) -> list[np.ndarray]:
        """Per layer, the four central cells' shares minus 1/4 ``(n, 4)`` over the showers
        ``(N, n_voxels)`` MeV with four hits there."""
        threshold = self.voxel_transform.threshold_mev
        core = showers.reshape(len(showers), self.geometry.n_layers, -1)[:, :, self._core_cells()]
        out = []
        for layer in range(self.geometry.n_layers):
            cells = core[:, layer].astype(np.float64)
            full = (cells >= threshold).all(1)
            out.append(cells[full] / cells[full].sum(1, keepdims=True) - 0.25)
        return out

    def fit_core_split(self, reference: ShowerData, seed: int = 2,
                       generated: np.ndarray | None = None) -> None:
        """``core_split: calibrated``: per layer, the factor (0.25 .. 2) by which the
        model's core shares, sampled for ``reference``'s conditions with everything else
        applied (or ``generated`` ``(N, n_voxels)`` MeV, such a sample), must move from 1/4
        to spread as ``reference``'s (standard deviations; 1 where either has fewer than 20
        showers with a full core)."""
        self.core_split_factors = None
        if generated is None:
            generated = self._sample_in_flow_frame(reference, seed)
        factors = []
        for real, fake in zip(self._core_share_deviations(reference.showers),
                              self._core_share_deviations(generated)):
            if len(real) < 20 or len(fake) < 20 or fake.std() == 0:
                factors.append(1.0)
                continue
            factors.append(float(np.clip(real.std() / fake.std(), 0.25, 2.0)))
        self.core_split_factors = factors

    def _split_core(self, cells: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's cells ``(B, S)`` MeV with the four central cells' shares moved from
        1/4 by the layer's factor (kept in [0, 1], their sum kept) where all four are hits."""
        if self.core_split_factors is None or self.config.core_split == "none":
            return cells
        index = torch.as_tensor(self._core_cells(), device=cells.device)
        core = cells[:, index]  # (B, 4)
        total = core.sum(1, keepdim=True)
        full = (core >= self.voxel_transform.threshold_mev).all(1, keepdim=True)
        shares = core / total.clamp(min=torch.finfo(core.dtype).tiny)
        moved = (0.25 + self.core_split_factors[layer] * (shares - 0.25)).clamp(min=0)
        moved = moved / moved.sum(1, keepdim=True).clamp(min=torch.finfo(core.dtype).tiny)
        lowest = lowest_hit(self.voxel_transform.threshold_mev)
        split = torch.where(full, (moved * total).clamp(min=lowest), core)
        out = cells.clone()
        out[:, index] = split
        return out

    # --- persistence ------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {**super().to_json_state(), "trained_parts": self.trained_parts,
                "postprocess_nodes": self.postprocess_nodes,
                "layer_postprocess_nodes": self.layer_postprocess_nodes,
                "postprocess_groups": self.postprocess_groups,
                "group_postprocess_nodes": self.group_postprocess_nodes,
                "voxel_cuts_mev": self.voxel_cuts_mev,
                "voxel_cut_edges": self.voxel_cut_edges,
                "hit_count_model": None if self.hit_count_model is None
                else self.hit_count_model.state(),
                "core_split_factors": self.core_split_factors,
                "core_fraction_maps": None if self.core_fraction_maps is None
                else [fraction_map.state() for fraction_map in self.core_fraction_maps],
                "ring_spread_map": None if self.ring_spread_map is None
                else self.ring_spread_map.state()}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry) -> Any:
        if "standardise_cells" not in state["config"]:  # saved before the option: without
            state = {**state, "config": {**state["config"], "standardise_cells": False}}
        return super().from_json_state(state, geometry)

    def _restore_extra_state(self, state: dict[str, Any]) -> None:
        self.trained_parts = [str(p) for p in state.get("trained_parts", [])]
        nodes = state.get("postprocess_nodes")
        self.postprocess_nodes = None if nodes is None else [list(map(float, v)) for v in nodes]
        layers = state.get("layer_postprocess_nodes")  # saved before the option: absent
        self.layer_postprocess_nodes = None if layers is None else [
            None if pair is None else [list(map(float, v)) for v in pair] for pair in layers]
        groups = state.get("postprocess_groups")  # saved before group-spline: absent
        self.postprocess_groups = None if groups is None else [int(g) for g in groups]
        group_nodes = state.get("group_postprocess_nodes")
        self.group_postprocess_nodes = None if group_nodes is None else [
            None if pair is None else [list(map(float, v)) for v in pair] for pair in group_nodes]
        cuts = state.get("voxel_cuts_mev")  # models saved before the calibration: None
        self.voxel_cuts_mev = None if cuts is None else [float(c) for c in cuts]
        edges = state.get("voxel_cut_edges")  # saved before hit_calibration_bins: absent
        self.voxel_cut_edges = None if edges is None else {
            str(name): [float(e) for e in values] for name, values in edges.items()}
        counts = state.get("hit_count_model")  # saved before hit_counts: absent
        self.hit_count_model = None if counts is None else HitCountModel.from_state(counts)
        factors = state.get("core_split_factors")  # saved before core_split: absent
        self.core_split_factors = None if factors is None else [float(f) for f in factors]
        self.core_fraction_maps = core_fraction_maps_from_state(state)
        spread = state.get("ring_spread_map")  # saved before ring_spread: absent
        self.ring_spread_map = None if spread is None else RingSpreadMap.from_state(spread)


def merge_runs(models: list[ConvL2LFlow]) -> ConvL2LFlow:
    """One model from runs that trained disjoint parts of the same configuration on the
    same data (same fitted preprocessing). Raises CaloforgeError on any mismatch."""
    if not models:
        raise OptionError("nothing to merge")
    first = models[0]
    reference = _comparable_state(first)
    merged = ConvL2LFlow.from_json_state({**first.to_json_state(), "config": {
        **first.config.to_dict(), "layers": "all"}}, first.geometry)
    weights = merged.module.state_dict()
    fitted = {key: value for key, value in first.module.state_dict().items()
              if key.startswith("cell_")}  # the cell statistics: every run fitted the same
    weights.update(fitted)
    owner: dict[str, int] = {}
    for number, model in enumerate(models):
        same_statistics = all(torch.equal(model.module.state_dict()[key], value)
                              for key, value in fitted.items())
        if model.family != first.family or _comparable_state(model) != reference \
                or not same_statistics:
            raise CaloforgeError(f"run {number + 1} differs from run 1 in configuration, "
                                 f"geometry or fitted preprocessing: runs to merge must come "
                                 f"from the same data and config, differing only in --layers")
        for part in model.trained_parts:
            if part in owner:
                raise CaloforgeError(f"part {part} is trained in runs {owner[part] + 1} and "
                                     f"{number + 1}; merge runs with disjoint --layers")
            owner[part] = number
            prefix = "flow1." if part == ENERGY_PART else f"layer_flows.{part}."
            for key, value in model.module.state_dict().items():
                if key.startswith(prefix):
                    weights[key] = value
    merged.module.load_state_dict(weights)
    merged.trained_parts = sorted(owner, key=lambda p: -1 if p == ENERGY_PART else int(p))
    merged.postprocess_nodes = merged.layer_postprocess_nodes = merged.voxel_cuts_mev = None
    merged.voxel_cut_edges = merged.layer_hit_map = None
    merged.training_summary = {"merged_from": [m.training_summary for m in models]}
    return merged


def _comparable_state(model: ConvL2LFlow) -> dict[str, Any]:
    state = model.to_json_state()
    config = {k: v for k, v in state["config"].items() if k not in ("layers", "training")}
    return {"geometry": model.geometry.to_dict(), "config": config,
            **{k: v for k, v in state.items()
               if k not in ("config", "trained_parts", "postprocess_nodes",
                            "layer_postprocess_nodes", "voxel_cuts_mev",
                            "voxel_cut_edges", "hit_count_model", "core_split_factors",
                            "core_fraction_maps", "layer_hit_map", "ring_spread_map")}}


__all__ = ["POSTPROCESS_ENERGIES", "PRESETS", "ConvFlowConfig", "ConvL2LFlow",
           "interquartile_spread", "merge_runs", "monotone_log_map", "parse_parts"]
