"""Trustworthiness of the evaluation: same distribution -> AUC ~ 0.5, distortions caught."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from caloforge.cli import main
from caloforge.data import ShowerData, write_showers
from caloforge.errors import CaloforgeError, OptionError
from caloforge.evaluation import (
    PRESETS,
    EvaluationSettings,
    benchmark_sampling,
    build_classifier,
    classifier_test,
    evaluate_samples,
    format_summary,
    fpd,
    frechet_distance,
    get_preset,
    high_level_features,
    kpd,
    official_feature_bins,
    prdc,
    separation_power,
    split_sizes,
)
from caloforge.evaluation.features import (
    classifier_high_level_inputs,
    classifier_low_level_normed_inputs,
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
    # layer 0 voxels: (alpha bin 0: r 0.5, 2.0), (alpha bin 1: r 0.5, 2.0);
    # alpha centres -pi/2, pi/2
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
    value, error = fpd(x, y, normalise=False)
    assert value == pytest.approx(expected, rel=0.05) and 0 < error < 0.05 * expected
    same, same_error = fpd(x, rng.normal(0, sd1, (20000, 2)), normalise=False)
    assert 0 <= same < 0.01  # the fit bounds the intercept at >= 0


def test_fpd_scales_by_the_reference_max():
    """jetnet's normalisation: both samples divided by the reference's max |x| per feature."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, [1.0, 50.0], (20000, 2))
    y = rng.normal([0.3, 10.0], [1.0, 50.0], (20000, 2))
    scale = np.abs(x).max(axis=0)
    assert fpd(x, y) == pytest.approx(fpd(x / scale, y / scale, normalise=False))
    expected = np.sum((np.array([0.3, 10.0]) / scale) ** 2)
    assert fpd(x, y)[0] == pytest.approx(expected, rel=0.1)


def test_kpd_of_identical_and_shifted_samples():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (20000, 3))
    k_same, k_same_err = kpd(x, rng.normal(0, 1, (20000, 3)), n_batches=6, batch_size=2000)
    k_shift, k_shift_err = kpd(x, rng.normal(0.3, 1, (20000, 3)), n_batches=6, batch_size=2000)
    assert abs(k_same) < 3 * k_same_err + 1e-4
    assert k_shift > 10 * max(k_shift_err, abs(k_same))


def test_mmd_blocks_equal_the_whole_matrix():
    from caloforge.evaluation.distances import mmd_poly_unbiased

    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (300, 4)), rng.normal(0.2, 1, (250, 4))
    kxx, kyy, kxy = ((a @ b.T / 4 + 1) ** 4 for a, b in ((x, x), (y, y), (x, y)))
    whole = ((kxx.sum() - np.trace(kxx)) / (300 * 299) + (kyy.sum() - np.trace(kyy)) / (250 * 249)
             - 2 * kxy.mean())
    assert mmd_poly_unbiased(x, y, block=64) == pytest.approx(whole, rel=1e-10)


def test_prdc_of_same_and_disjoint_samples():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (2000, 3))
    same = prdc(x, rng.normal(0, 1, (2000, 3)), nearest_k=5)
    assert same["precision"] > 0.8 and same["recall"] > 0.8 and same["coverage"] > 0.9
    assert same["density"] == pytest.approx(1.0, abs=0.15)
    far = prdc(x, rng.normal(50, 1, (2000, 3)), nearest_k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_official_classifier_network():
    """Three hidden layers of 2048 in float64: d*2048 + 2*2048^2 + 2048 weights plus biases."""
    d = 368 + 1
    model = build_classifier(d, PRESETS["official"])
    expected = (d * 2048 + 2048) + 2 * (2048 * 2048 + 2048) + (2048 + 1)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in model) == 3
    narrow = build_classifier(d, get_preset("official", width=256, epochs=15))
    assert sum(p.numel() for p in narrow.parameters()) == \
        (d * 256 + 256) + 2 * (256 * 256 + 256) + 257
    fast = build_classifier(d, PRESETS["fast"])
    assert next(fast.parameters()).dtype == torch.float32


def test_official_split_sizes_and_refusal():
    official = PRESETS["official"]
    assert split_sizes(121_000, 130_000, official, "1-photons") == \
        ((80_000, 20_000, 21_000),) * 2
    assert split_sizes(120_800, 120_800, official, "1-pions")[0] == (80_000, 20_000, 20_800)
    assert split_sizes(100_000, 100_000, official, "2")[1] == (60_000, 20_000, 20_000)
    with pytest.raises(CaloforgeError, match="needs 121000 showers per sample.*gen.h5 has 10000"):
        split_sizes(121_000, 10_000, official, "1-photons", labels=("ref.h5", "gen.h5"))
    # no official sizes for other geometries: equal classes, 60/20/20
    assert split_sizes(1000, 3000, official, None) == ((600, 200, 200),) * 2
    assert split_sizes(1000, 3000, PRESETS["fast"], "1-photons") == \
        ((600, 200, 200), (1800, 600, 600))
    with pytest.raises(OptionError):
        get_preset("official", width=0)


def test_official_preset_runs_with_overrides():
    """A narrow, short official classifier on samples without official sizes: equal classes,
    60/20/20, all epochs unless the test accuracy reaches 1."""
    rng = np.random.default_rng(5)
    preset = get_preset("official", width=16, epochs=3)
    result = classifier_test(rng.normal(0, 1, (500, 4)), rng.normal(0, 1, (800, 4)), preset)
    assert result["n_train"] == 600 and result["n_test"] == 200 and result["n_val"] == 200
    assert result["epochs_run"] == 3 and result["auc"] == pytest.approx(0.5, abs=0.1)
    separable = classifier_test(rng.normal(0, 1, (5000, 4)), rng.normal(9, 1, (5000, 4)),
                                get_preset("official", width=64, epochs=40), seed=1)
    assert separable["test_accuracy"] == 1.0 and separable["epochs_run"] < 40
    assert separable["auc"] > 0.99


def test_official_sizes_are_refused_before_any_work(samples, tmp_path):
    reference, generated = samples
    settings = EvaluationSettings(metrics=("hist", "cls-low"), classifier_preset="official",
                                  repeats=1, extra={"generated_file": "gen.h5"})
    with pytest.raises(CaloforgeError, match="dataset 1-photons needs 121000"):
        evaluate_samples(reference, generated, GEOMETRY, str(tmp_path / "r"), settings,
                         log=lambda _: None)
    assert not (tmp_path / "r").exists()


def test_official_binning_for_calochallenge_geometries(samples, tmp_path):
    reference, generated = samples
    result = _evaluate(reference, generated, tmp_path, metrics=("hist",))
    binning = result["separation_power_binning"]
    assert binning["E_tot/E_inc"] == binning["E_L1"] == binning["EC_x_L1"] == "official"
    assert binning["voxel_energy"] == "official" and binning["sparsity_L1"] == "quantile"
    np.testing.assert_array_equal(
        official_feature_bins("E_tot/E_inc", "1-photons", np.ones(3), 1.0),
        np.linspace(0.5, 1.5, 101))
    assert official_feature_bins("EC_x_L12", "1-pions", np.ones(3), 1.0)[0] == -500
    assert official_feature_bins("width_y_L3", "2", np.ones(3), 0.01515)[-1] == 30
    layer = official_feature_bins("E_L2", "1-photons", np.array([5.0, 1e4]), 1.0)
    assert len(layer) == 40 and layer[0] == pytest.approx(1.0) and layer[-1] == pytest.approx(1e4)
    # values outside an official range are dropped, not piled into the edge bins
    bins = np.linspace(0.5, 1.5, 101)
    inside = np.full(100, 1.0)
    assert separation_power(inside, np.concatenate([inside, np.full(100, 3.0)]), bins,
                            clip=False) == 0.0
    # other geometries keep quantile binning
    lhcb = get_geometry("lhcb-ecal")
    sim = ReferenceSimulator("lhcb-ecal")
    rng = np.random.default_rng(0)
    a, b = (sim.simulate(np.full(300, 2e4), rng=rng) for _ in range(2))
    other = evaluate_samples(a, b, lhcb, str(tmp_path / "lhcb"),
                             EvaluationSettings(metrics=("hist",)), log=lambda _: None)
    assert set(other["separation_power_binning"].values()) == {"quantile"}


def test_low_level_normed_inputs():
    showers = np.zeros((2, GEOMETRY.n_voxels), np.float32)
    showers[0, 0], showers[0, 1], showers[1, 10] = 3.0, 1.0, 2.0
    inputs = classifier_low_level_normed_inputs(showers, np.array([100.0, 1000.0]), GEOMETRY)
    assert inputs.shape == (2, 1 + GEOMETRY.n_voxels + GEOMETRY.n_layers)
    np.testing.assert_allclose(inputs[:, 0], [2.0, 3.0])
    np.testing.assert_allclose(inputs[0, 1:3], [0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(inputs[0, -GEOMETRY.n_layers], np.log10(4.0), rtol=1e-6)
    assert inputs[0, -1] == pytest.approx(-8.0)  # an empty layer: log10(1e-8)


def test_inputs_built_in_blocks_equal_the_whole(monkeypatch):
    """The evaluation builds its inputs a block of showers at a time (memory: 20,000
    calochallenge-3 showers are 3.2 GB in float32, twice that in float64); blocks that do
    not divide the sample give the arrays of one block (the features to float64 rounding:
    BLAS sums a matrix product in another order for another number of rows)."""
    from caloforge.evaluation import features as evaluation_features

    rng = np.random.default_rng(4)
    showers = (rng.exponential(1.0, (37, GEOMETRY.n_voxels))
               * (rng.random((37, GEOMETRY.n_voxels)) < 0.3)).astype(np.float32)
    energies = rng.uniform(1e3, 1e5, 37)
    whole = high_level_features(showers, energies, GEOMETRY, rows_per_block=100)
    blocked = high_level_features(showers, energies, GEOMETRY, rows_per_block=5)
    assert list(blocked.values) == list(whole.values) and blocked.kinds == whole.kinds
    for name, values in whole.values.items():
        np.testing.assert_allclose(blocked.values[name], values, rtol=1e-12, atol=1e-12)
    expected = (evaluation_features.classifier_low_level_inputs(showers, energies),
                classifier_low_level_normed_inputs(showers, energies, GEOMETRY))
    monkeypatch.setattr(evaluation_features, "ROWS_PER_BLOCK", 6)
    np.testing.assert_array_equal(
        evaluation_features.classifier_low_level_inputs(showers, energies), expected[0])
    np.testing.assert_array_equal(
        classifier_low_level_normed_inputs(showers, energies, GEOMETRY), expected[1])


def test_low_level_inputs_built_for_the_rows_asked_for(samples):
    """``LowLevelInputs`` (the report's low-level input) gives the rows of
    ``classifier_low_level_inputs`` for any index, and the classifier trained on it gives
    exactly the AUC it gives on the whole array."""
    from caloforge.evaluation.features import LowLevelInputs, classifier_low_level_inputs

    reference, generated = (s.select(slice(0, 300)) for s in samples)
    generated.showers[:, :50] *= 1.3  # something to find
    lazy = [LowLevelInputs(s.showers, s.incident_energies) for s in (reference, generated)]
    whole = [classifier_low_level_inputs(s.showers, s.incident_energies)
             for s in (reference, generated)]
    assert lazy[0].shape == whole[0].shape and len(lazy[0]) == 300
    rows = np.random.default_rng(7).permutation(300)[:40]
    np.testing.assert_array_equal(lazy[0][rows], whole[0][rows])
    preset = get_preset("fast", epochs=3)
    assert classifier_test(*lazy, preset, seed=3)["auc"] == \
        classifier_test(*whole, preset, seed=3)["auc"]


def test_classifier_reads_its_training_rows_batch_by_batch():
    """The classifier's training split is read row by row from the two samples instead of
    copied out: the rows it gathers, their labels and the standardisation moments are those
    of the copied-out split."""
    from caloforge.evaluation.classifier import _Rows

    rng = np.random.default_rng(5)
    reference = rng.normal(0, 1, (50, 7)).astype(np.float32)
    generated = rng.normal(3, 2, (40, 7)).astype(np.float32)
    rows = _Rows(reference, generated, rng.permutation(50)[:30], rng.permutation(40)[:25])
    copied = np.concatenate([reference[rows.rows[0]], generated[rows.rows[1]]])
    assert len(rows) == 55
    np.testing.assert_array_equal(rows.labels(), np.r_[np.zeros(30), np.ones(25)])
    positions = rng.permutation(55)[:17]
    np.testing.assert_array_equal(rows.take(positions), copied[positions])
    mean, std = rows.moments(chunk=4)
    np.testing.assert_allclose(mean, copied.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, copied.astype(np.float64).std(0), rtol=1e-8)


def test_showers_are_thresholded_in_a_copy_unless_handed_over(samples, tmp_path):
    """Voxels under the threshold are zeroed in a copy of the caller's arrays (left as
    they were), in the arrays themselves where the caller hands them over (the CLI: no
    second copy of 20,000 fine-grained showers), and not at all where none lies under it;
    the separation powers are the same every way."""
    rng = np.random.default_rng(6)
    faint = [ShowerData(s.incident_energies[:400], s.showers[:400].copy(), {}, {})
             for s in samples]
    for sample in faint:
        empty = sample.showers == 0
        sample.showers[empty & (rng.random(sample.showers.shape) < 0.05)] = \
            0.5 * GEOMETRY.threshold_mev
    originals = [sample.showers.copy() for sample in faint]
    settings = EvaluationSettings(metrics=("hist",), repeats=1)
    copied = evaluate_samples(*faint, GEOMETRY, str(tmp_path / "a"), settings,
                              log=lambda _: None)
    for sample, original in zip(faint, originals):
        np.testing.assert_array_equal(sample.showers, original)
    handed = evaluate_samples(*faint, GEOMETRY, str(tmp_path / "b"), settings,
                              log=lambda _: None, own_showers=True)
    for sample in faint:
        assert not ((sample.showers > 0) & (sample.showers < GEOMETRY.threshold_mev)).any()
    clean = evaluate_samples(*faint, GEOMETRY, str(tmp_path / "c"), settings,
                             log=lambda _: None)
    assert copied["separation_power"] == handed["separation_power"] == \
        clean["separation_power"]


def test_high_level_inputs_follow_the_official_order(samples):
    reference, _ = samples
    features = high_level_features(reference.showers[:50], reference.incident_energies[:50],
                                   GEOMETRY)
    inputs = classifier_high_level_inputs(features, reference.incident_energies[:50], GEOMETRY)
    n_layers = GEOMETRY.n_layers
    xy = [layer for layer in GEOMETRY.layers if layer.n_alpha > 1]
    assert inputs.shape[1] == 1 + n_layers + 4 * len(xy) + 1 + n_layers + 2 * n_layers
    v = features.values
    tag = f"L{xy[0].layer_id}"
    np.testing.assert_allclose(inputs[:, 1 + n_layers], v[f"EC_x_{tag}"] / 100)
    np.testing.assert_allclose(inputs[:, 1 + n_layers + len(xy)], v[f"EC_y_{tag}"] / 100)
    np.testing.assert_allclose(inputs[:, -1], v[f"width_r_L{GEOMETRY.layers[-1].layer_id}"] / 100)


def test_all_metrics_are_recorded_with_their_definitions(samples, tmp_path):
    reference, generated = samples
    settings = EvaluationSettings(metrics=("cls-low-normed", "fpd", "kpd", "prdc"),
                                  classifier_preset="fast", classifier_width=32,
                                  classifier_epochs=2, repeats=1)
    result = evaluate_samples(reference, generated, GEOMETRY, str(tmp_path), settings,
                              log=lambda _: None)
    written = json.loads((tmp_path / "metrics.json").read_text())
    cls = written["cls-low-normed"]
    assert cls["preset"]["hidden"] == 32 and cls["preset"]["max_epochs"] == 2
    assert cls["preset"]["dtype"] == "float32" and cls["n_inputs"] == 1 + 368 + 5
    assert written["fpd_x1e3"]["definition"]["source"] == "jetnet 0.2 fpd"
    assert written["kpd_x1e3"]["definition"]["batch_size"] == 10_000
    assert written["prdc"]["definition"]["nearest_k"] == 5
    assert written["fpd_x1e3"]["n_reference"] == N and written["calochallenge_dataset"] == \
        "1-photons"
    assert 0.5 < result["prdc"]["coverage"] <= 1.0
    assert "precision / recall" in format_summary(result)


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


def test_evaluate_cli_without_plots_keeps_the_separation_powers(tmp_path):
    sim = ReferenceSimulator("calochallenge-1-photons")
    rng = np.random.default_rng(3)
    files = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for path in files:
        write_showers(path, sim.simulate(np.full(150, 1e4), "photon", rng=rng), GEOMETRY)
    powers = {}
    for plots in (True, False):
        out = tmp_path / f"report-{plots}"
        args = ["evaluate", "--reference", str(files[0]), "--generated", str(files[1]),
                "--geometry", GEOMETRY.name, "-o", str(out), "--metrics", "hist"]
        assert main(args + ([] if plots else ["--no-plots"])) == 0
        powers[plots] = json.loads((out / "metrics.json").read_text())["separation_power"]
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert (len(pngs) > 5) if plots else (pngs == []), pngs
        assert ("data:image/png" in (out / "report.html").read_text()) == plots
    np.testing.assert_equal(powers[True], powers[False])  # NaN == NaN here
    assert len(powers[False]) > 20
