"""Physics facts of shower samples (caloforge.evaluation.shower_facts) on synthetic showers
whose facts are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from caloforge.evaluation.shower_facts import compare_facts, shower_facts
from caloforge.geometry import CartesianLayer, CylindricalLayer, Geometry

EDGES = (0.0, 5.0, 10.0, 150.0)
GEOMETRY = Geometry("toy", tuple(CylindricalLayer(i, EDGES, 2) for i in range(6)),
                    threshold_mev=0.01)


def _showers(energies: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Visible fraction 0.25 with a relative spread; all energy in layer 2 (centre of gravity
    2.5) except one 1.05 MeV crossing in each central voxel of layer 0, and one voxel below
    the threshold."""
    n = len(energies)
    grid = np.zeros((n, 6, 2, 3))
    visible = 0.25 * energies * (1 + spread * rng.standard_normal(n))
    grid[:, 2, :, 0] = (visible - 2 * 1.05)[:, None] / 2 * 0.6
    grid[:, 2, :, 1] = (visible - 2 * 1.05)[:, None] / 2 * 0.4
    grid[:, 0, :, 0] = 1.05
    grid[:, 5, 0, 2] = 0.001  # under the 10 keV threshold: not a hit, not counted
    return grid.reshape(n, -1).astype(np.float32)


def test_facts_of_a_sample_built_to_have_them():
    rng = np.random.default_rng(0)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 4000))
    facts = shower_facts(_showers(energies, rng, 0.04), energies, GEOMETRY)
    assert len(facts["energy_bins"]) == 8
    for row in facts["energy_bins"]:
        assert row["visible_fraction"] == pytest.approx(0.25, rel=0.01)
        assert row["resolution"] == pytest.approx(0.04, rel=0.15)
        assert row["last_layer_share"] == 0.0  # the sub-threshold voxel is cut
        assert row["occupancy"] == pytest.approx(6 / 36)
        assert 1.0 < row["cog_layer"] < 2.5  # layer 2 (2.5) pulled forward by the crossings
    # the crossings weigh less at high energy: the centre of gravity moves back with ln E
    assert facts["cog_vs_ln_e_gev"]["slope_layers"] > 0
    assert facts["mip_peak_mev"] == pytest.approx(1.05)
    containment = facts["radial_containment"]
    assert containment["150"] == pytest.approx(1.0)
    assert 0.6 < containment["5"] < containment["10"] == pytest.approx(1.0)


def test_comparison_measures_the_targets():
    rng = np.random.default_rng(1)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 4000))
    reference = shower_facts(_showers(energies, rng, 0.04), energies, GEOMETRY)
    wider = _showers(energies, rng, 0.06) * 1.1  # 10 % more visible energy, 50 % wider
    measures = compare_facts(reference, shower_facts(wider, energies, GEOMETRY))
    assert measures["worst_visible_fraction_rel"] == pytest.approx(0.10, abs=0.01)
    assert measures["worst_resolution_rel"] == pytest.approx(0.5, abs=0.2)
    assert measures["hit_median_rel"] == pytest.approx(0.10, abs=0.01)
    assert measures["mip_peak_rel"] == pytest.approx(0.10, abs=0.05)  # 0.1 MeV bins


def test_facts_need_one_cylindrical_binning():
    cartesian = Geometry("cells", (CartesianLayer(0, 3, 3, 5.0, 5.0),))
    with pytest.raises(ValueError, match="one cylindrical binning"):
        shower_facts(np.ones((20, 9)), np.full(20, 1e3), cartesian)
