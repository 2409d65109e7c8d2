"""Trustworthiness of the evaluation: same distribution -> AUC ~ 0.5, distortions caught."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from caloforge.cli import main
from caloforge.data import ShowerData, write_showers
from caloforge.evaluation import (
    EvaluationSettings,
    evaluate_samples,
    fpd,
    frechet_distance,
    high_level_features,
    kpd,
    separation_power,
    benchmark_sampling,
)
from caloforge.geometry import CartesianLayer, CylindricalLayer, Geometry, get_geometry
from caloforge.simulator import ReferenceSimulator, SimulationPlan, iter_simulated_chunks

GEOMETRY = get_geometry("calochallenge-1-photons")
N = 8000


def _sample(seed: int) -> ShowerData:
    plan = SimulationPlan.from_options(GEOMETRY.name, N, seed=seed)
    return ShowerData.concatenate(list(iter_simulated_chunks(plan)))


@pytest.fixture(scope="module")
def samples():
    return _sample(1), _sample(2)


def _evaluate(reference, generated, tmp_path, metrics=("hist", "cls-low", "cls-high")):
    settings = EvaluationSettings(metrics=metrics, classifier_preset="fast", repeats=1)
    return evaluate_samples(reference, generated, GEOMETRY, str(tmp_path), settings,
                            log=lambda _: None)


def test_same_distribution_is_indistinguishable(samples, tmp_path):
    result = _evaluate(*samples, tmp_path, metrics=("hist", "cls-low", "cls-high", "fpd", "kpd"))
    assert result["cls-low"]["auc_mean"] == pytest.approx(0.5, abs=0.03)
    assert result["cls-high"]["auc_mean"] == pytest.approx(0.5, abs=0.03)
    assert max(result["separation_power"].values()) < 0.01
    assert abs(result["fpd_x1e3"]["value"]) < 5 * max(result["fpd_x1e3"]["error"], 1.0)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["cls-low"]["preset"]["name"] == "fast"
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64" in page and "classifier AUC, low-level" in page


def test_scaled_layer_is_caught(samples, tmp_path):
    reference, generated = samples
    distorted = generated.select(slice(None))
    distorted.showers = distorted.showers.copy()
    middle = GEOMETRY.layer_slices[2]
    distorted.showers[:, middle] *= 1.1
    result = _evaluate(reference, distorted, tmp_path, metrics=("hist", "cls-high"))
    sep = result["separation_power"]
    others = [v for k, v in sep.items() if k not in ("E_L2", "E_tot", "E_tot/E_inc")]
    assert sep["E_L2"] > 5 * max(others)
    assert sep["E_tot/E_inc"] > 5 * max(others)
    # A gradient-boosted tree reaches ~0.90 on these features; the fast MLP ~0.8 (8k vs 8k).
    assert result["cls-high"]["auc_mean"] > 0.7


def test_radial_shift_is_caught(samples, tmp_path):
    reference, generated = samples
    shifted = generated.select(slice(None))
    layers = GEOMETRY.split_layers(shifted.showers.copy())
    moved = []
    for image in layers:  # move every shower one radial bin outwards
        out = np.zeros_like(image)
        out[..., 1:] = image[..., :-1]
        out[..., -1] += image[..., -1]
        moved.append(out.reshape(len(image), -1))
    shifted.showers = np.concatenate(moved, axis=1)
    result = _evaluate(reference, shifted, tmp_path, metrics=("hist", "cls-low"))
    assert result["cls-low"]["auc_mean"] > 0.9
    sep = result["separation_power"]
    assert sep["EC_r_L2"] > 0.2 and sep["EC_r_L2"] > 10 * sep["E_L2"]


def test_features_of_hand_built_shower():
    geometry = Geometry("tiny", (CylindricalLayer(0, (0.0, 1.0, 3.0), 2),
                                 CartesianLayer(1, nx=2, ny=1, dx=2.0, dy=2.0)))
    # layer 0 voxels: (alpha bin 0: r 0.5, 2.0), (alpha bin 1: r 0.5, 2.0); alpha centres -pi/2, pi/2
    shower = np.array([[1.0, 3.0, 0.0, 0.0, 2.0, 2.0]])
    features = high_level_features(shower, np.array([16.0]), geometry).values
    assert features["E_tot"][0] == 8.0 and features["E_tot/E_inc"][0] == 0.5
    assert features["E_L0"][0] == 4.0 and features["sparsity_L0"][0] == 0.5
    assert features["EC_r_L0"][0] == pytest.approx((1 * 0.5 + 3 * 2.0) / 4)
    second = (1 * 0.25 + 3 * 4.0) / 4
    assert features["width_r_L0"][0] == pytest.approx(math.sqrt(second - 1.625 ** 2))
    assert features["EC_y_L0"][0] == pytest.approx(-1.625)  # both hits at alpha = -pi/2
    assert features["EC_x_L0"][0] == pytest.approx(0.0, abs=1e-12)
    assert features["EC_x_L1"][0] == 0.0 and features["width_x_L1"][0] == 1.0
    assert features["sparsity_L1"][0] == 0.0


def test_separation_power_limits():
    bins = np.linspace(0, 1, 11)
    a = np.random.default_rng(0).random(1000)
    assert separation_power(a, a, bins) == 0.0
    assert separation_power(np.full(10, 0.05), np.full(10, 0.95), bins) == pytest.approx(1.0)


def test_fpd_matches_closed_form():
    rng = np.random.default_rng(0)
    mu, sd1, sd2 = np.array([0.5, -0.2]), np.array([1.0, 2.0]), np.array([1.5, 1.0])
    x = rng.normal(0, sd1, (20000, 2))
    y = rng.normal(mu, sd2, (20000, 2))
    expected = mu @ mu + np.sum((sd1 - sd2) ** 2)  # diagonal covariances
    assert frechet_distance(np.zeros(2), np.diag(sd1 ** 2), mu, np.diag(sd2 ** 2)) == \
        pytest.approx(expected)
    value, error = fpd(x, y, n_points=5, n_batches=3)
    assert value == pytest.approx(expected, rel=0.05)
    same, _ = fpd(x, rng.normal(0, sd1, (20000, 2)), n_points=5, n_batches=3)
    assert abs(same) < 0.01
    k_same, k_same_err = kpd(x, rng.normal(0, sd1, (20000, 2)), n_batches=6, batch_size=2000)
    k_diff, _ = kpd(x, y, n_batches=6, batch_size=2000)
    assert abs(k_same) < 0.05 * k_diff and abs(k_same) < 3 * k_same_err + 1e-3


def test_timing_helper_reports_each_batch_size():
    calls = []
    results = benchmark_sampling(lambda n: calls.append(n), threads=[1], batch_sizes=(1, 100),
                                 repeats=2)
    assert [r["batch_size"] for r in results] == [1, 100]
    assert all(r["ms_per_shower"] > 0 and r["threads"] == 1 and r["repeats"] == 2
               for r in results)
    assert calls.count(1) == 1 + 2 * 50  # warm-up + repeats x calls


def test_evaluate_cli_bad_inputs(tmp_path, capsys):
    sim = ReferenceSimulator("calochallenge-1-photons")
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.h5"
    write_showers(ref, sim.simulate(np.full(200, 1e4), "photon", rng=rng), GEOMETRY)
    few = tmp_path / "few.h5"
    write_showers(few, sim.simulate(np.full(20, 1e4), "photon", rng=rng), GEOMETRY)
    other = tmp_path / "other.h5"
    calogan = get_geometry("calogan")
    write_showers(other, ReferenceSimulator("calogan").simulate(np.full(30, 1e4), rng=rng),
                  calogan)
    empty = tmp_path / "empty.h5"
    import h5py

    with h5py.File(empty, "w") as h5:
        h5["incident_energies"] = np.zeros((0, 1))
        h5["showers"] = np.zeros((0, 368), np.float32)
    cases = [(other, "504 voxels"), (few, "at least 50"), (empty, "no showers")]
    for generated, message in cases:
        out = tmp_path / f"report-{generated.stem}"
        status = main(["evaluate", "--reference", str(ref), "--generated", str(generated),
                       "--geometry", GEOMETRY.name, "-o", str(out), "--metrics", "cls-low"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and message in err[-1], err
        assert not (out / "metrics.json").exists()
    assert main(["evaluate", "--reference", str(ref), "--generated", str(ref), "--geometry",
                 GEOMETRY.name, "-o", str(tmp_path / "r"), "--metrics", "nope"]) == 1
