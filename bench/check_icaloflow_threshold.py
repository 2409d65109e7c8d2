"""Issue 28, iCaloFlow's faint hits: where do the voxels just above the threshold come from?

On calochallenge-2 the iCaloFlow teacher put 11-21 % of its non-zero voxels between the
15 keV cut and 100 keV, where the reference has 0.6 %: the reference's cells hold nothing
or a deposit of a charged particle crossing them (well above 0.1 MeV), while the flows
generate empty cells (dequantisation noise, about logit -13 after dividing by the layer
energy) a few logit units too high, above the cut.

The experiment trains the same small iCaloFlow on the same toy showers (8 layers of 6 x 6
cells, layer energies from a few MeV to GeV, each cell's deposit the sum of Poisson-many
crossings of ~0.5 MeV: empty or well above the 15 keV cut, as in the readout response;
deep layers hold one to four hits) once per variant and reports, on 2,000 held-out showers:

* hits per shower (generated / reference), per layer and overall;
* the share of hits between the cut and 0.1 MeV (faint hits; reference: 0.3 %);
* the layer energies and their spread (generated / reference), so that a fix which only
  removes cells is seen to keep the energy where it belongs.

Variants: ``threshold-only`` (the recipe before the fix: cut at the readout threshold),
``noise-1000`` (dequantisation noise a thousandth of the cut instead of a thirtieth: a wider
gap between empty cells and the threshold), ``bins-16`` (twice the spline bins), ``band``
(a prototype: empty cells dequantised in a band just below the faintest real deposits,
no gap to bridge), ``calibrated`` (the default now: a cut per layer calibrated after
training, :meth:`ICaloFlow.calibrate_hits`) and ``calibrated-spline`` (and the voxel
spectrum mapped onto the training data's, ``postprocess: spline``).

    python bench/check_icaloflow_threshold.py --variant threshold-only --out r-before.json
    python bench/check_icaloflow_threshold.py --variant calibrated --epochs 24 --out r.json

Each run takes one to four minutes on one thread.
"""

from __future__ import annotations

import numpy as np
import torch
from pipeline import fit_and_generate, report_figures, square_layers, toy_experiment_parser

from caloforge.data import ShowerData
from caloforge.models.flows.icaloflow import ICaloFlow
from caloforge.models.flows.toolkit import FlowConfig
from caloforge.preprocessing import LogitTransform, VoxelTransform, cut_below

SIDE, LAYERS, CUT_MEV, CROSSING_MEV, FAINT_MEV = 6, 8, 0.015, 0.5, 0.1

# variant -> ICaloFlowConfig fields
VARIANTS: dict[str, dict] = {
    "threshold-only": {"hit_calibration_showers": 0},
    "noise-1000": {"noise_mev": CUT_MEV / 1000, "hit_calibration_showers": 0},
    "bins-16": {"bins": 16, "hit_calibration_showers": 0},
    "band": {"hit_calibration_showers": 0},
    "calibrated": {},  # the default: a cut per layer calibrated on 1,000 training showers
    "calibrated-spline": {"postprocess": "spline"},  # and the voxel spectrum mapped
}


class BandVoxelTransform(VoxelTransform):
    """Prototype: hits (>= ``hit_floor_mev``) as now; empty cells in a band of
    ``band`` logit units just below the logit of the hit floor (no gap to bridge)."""

    hit_floor_mev: float = 0.0
    band: float = 2.0

    def boundary(self, layer_energies: torch.Tensor) -> torch.Tensor:
        share = (self.hit_floor_mev / layer_energies.clamp(min=self.hit_floor_mev))
        return LogitTransform(self.alpha).forward(share)

    def inverse(self, x: torch.Tensor, layer_energies: torch.Tensor) -> torch.Tensor:
        hit = x >= self.boundary(layer_energies)
        shares = LogitTransform(self.alpha).inverse(x) * hit
        shares = shares / shares.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
        return cut_below(shares * layer_energies, self.threshold_mev)


class BandICaloFlow(ICaloFlow):
    def _fit_preprocessing(self, data):
        hits = data.showers[data.showers > 0]
        band = BandVoxelTransform(self.voxel_transform.layer_sizes,
                                  self.voxel_transform.noise_mev,
                                  self.voxel_transform.threshold_mev, self.voxel_transform.alpha)
        band.hit_floor_mev = float(np.quantile(hits, 0.005))
        self.voxel_transform = band
        super()._fit_preprocessing(data)

    def _normalised_layers(self, voxels, generator):
        transform = self.voxel_transform
        noisy = self._layers(transform.add_noise(voxels, generator))
        energies = noisy.sum(-1)
        layers = self._layers(voxels)
        shares = layers / energies[..., None].clamp(min=torch.finfo(noisy.dtype).tiny)
        x = LogitTransform(transform.alpha).forward(shares)
        if isinstance(transform, BandVoxelTransform):
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            empty = transform.boundary(energies)[..., None] - transform.band * u
            x = torch.where(layers >= transform.hit_floor_mev, x, empty)
        return energies, x


def crossing_showers(n: int, seed: int) -> ShowerData:
    """Toy showers whose cells are empty or hold whole crossings of ~0.5 MeV.

    Incident energies log-uniform in 1-100 GeV; a longitudinal profile peaking in layer 2
    and falling ~e-fold per layer after it (deep layers hold a few MeV: a handful of hits);
    a Gaussian lateral profile 0.8-1.6 cells wide at a jittered centre; each cell takes
    Poisson(mean / 0.5 MeV) crossings of Gamma(4, 0.125 MeV) each (mean 0.5 MeV)."""
    rng = np.random.default_rng(seed)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] - (SIDE - 1) / 2
    centre = rng.normal(0, 0.4, (n, 2))
    depth = np.arange(LAYERS)
    profile = np.exp(-np.abs(depth - 2) * 1.1)
    profile = profile / profile.sum()
    layers = []
    for layer in range(LAYERS):
        layer_energy = 0.02 * energies * profile[layer] * rng.gamma(6, 1 / 6, n)
        width = rng.uniform(0.8, 1.6, n)[:, None, None] * (1 + 0.15 * layer)
        distance2 = (xx[None] - centre[:, 0, None, None]) ** 2 + \
            (yy[None] - centre[:, 1, None, None]) ** 2
        share = np.exp(-distance2 / (2 * width ** 2))
        mean = share / share.sum((1, 2), keepdims=True) * layer_energy[:, None, None]
        crossings = rng.poisson(mean / CROSSING_MEV)
        image = rng.gamma(4.0 * np.maximum(crossings, 1), CROSSING_MEV / 4) * (crossings > 0)
        layers.append(image.reshape(n, -1))
    return ShowerData(energies, np.concatenate(layers, 1).astype(np.float32), {}, {})


def figures(showers: np.ndarray) -> dict[str, np.ndarray]:
    layers = showers.reshape(len(showers), LAYERS, SIDE * SIDE).astype(np.float64)
    hits = layers > 0
    return {"hits_per_layer": hits.sum(-1).mean(0),
            "faint_share": float(((layers > 0) & (layers < FAINT_MEV)).sum() / hits.sum()),
            "layer_energy": layers.sum(-1).mean(0),
            "layer_energy_spread": layers.sum(-1).std(0)}


def main() -> int:
    parser = toy_experiment_parser(__doc__.splitlines()[0], n_train=6000, epochs=8)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="calibrated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    geometry = square_layers("crossings", SIDE, LAYERS, CUT_MEV)
    train, heldout = crossing_showers(args.n_train, seed=1), crossing_showers(2000, seed=2)
    config = ICaloFlow.preset("tiny")
    config.flow1 = FlowConfig(blocks=4, hidden=[64, 64])
    config.flow2 = FlowConfig(blocks=4, hidden=[128])
    config.flow3 = FlowConfig(blocks=4, hidden=[128])
    for name, value in VARIANTS[args.variant].items():
        if name == "bins":
            for flow in (config.flow1, config.flow2, config.flow3):
                flow.bins = value
        else:
            setattr(config, name, value)
    config.training.epochs, config.training.batch_size = args.epochs, 64
    config.training.seed = args.seed
    model = (BandICaloFlow if args.variant == "band" else ICaloFlow)(geometry, config)
    seconds, generated = fit_and_generate(model, train, heldout)
    real, fake = figures(heldout.showers), figures(generated)
    result = {
        "variant": args.variant, "seed": args.seed, "train_seconds": round(seconds, 1),
        "best_val_loss": model.training_summary["best_val_loss"],
        "hits_per_shower": [round(float(real["hits_per_layer"].sum()), 1),
                            round(float(fake["hits_per_layer"].sum()), 1)],
        "reference_hits_per_layer": np.round(real["hits_per_layer"], 1).tolist(),
        "hits_per_layer_generated_over_reference": np.round(
            fake["hits_per_layer"] / real["hits_per_layer"], 2).tolist(),
        "faint_share": [round(real["faint_share"], 4), round(fake["faint_share"], 4)],
        "layer_energy_generated_over_reference": np.round(
            fake["layer_energy"] / real["layer_energy"], 3).tolist(),
        "layer_spread_generated_over_reference": np.round(
            fake["layer_energy_spread"] / real["layer_energy_spread"], 3).tolist(),
    }
    result["hit_cuts_mev"] = None if model.hit_cuts_mev is None else \
        np.round(model.hit_cuts_mev, 4).tolist()
    report_figures(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
