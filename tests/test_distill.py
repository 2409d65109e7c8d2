"""Teacher-student distillation (CaloFlow II) and the sampling benchmark, on tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zuko.transforms import MonotonicRQSTransform

from caloforge.cli import main
from caloforge.data import write_showers
from caloforge.evaluation.distances import fpd
from caloforge.evaluation.features import high_level_features
from caloforge.geometry import CartesianLayer, Geometry
from caloforge.models import load_model
from caloforge.models.flows.caloflow import CaloFlow, CaloFlowStudent
from caloforge.models.flows.distillation import DistillationConfig, kl_student_teacher
from caloforge.models.flows.toolkit import RQSpline
from caloforge.training import read_log

from conftest import Killed, killed_after_epoch, random_showers

# distillation is geometry-agnostic: a 3-layer, 27-voxel calorimeter keeps the tests fast
GEOMETRY = Geometry("tiny-3x3x3", tuple(CartesianLayer(i, nx=3, ny=3, dx=10.0, dy=10.0)
                                        for i in range(3)))


@pytest.fixture(scope="module")
def data():
    return random_showers(GEOMETRY, 2000, seed=5)


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("teacher"))
    model = CaloFlow(GEOMETRY, CaloFlow.preset("tiny"))
    model.config.training.epochs = 3
    model.fit(data, run_dir, metadata={"data": {"file": "unused.h5"}})
    return model, run_dir


def _tiny(epochs: int, **options) -> DistillationConfig:
    config = CaloFlowStudent.preset("tiny")
    config.training.epochs = epochs
    for key, value in options.items():
        setattr(config, key, value)
    return config


def _unit_sum(showers: np.ndarray) -> np.ndarray:
    return showers / np.maximum(showers.sum(1, keepdims=True), 1e-9)


def _shape_features(showers, energies) -> np.ndarray:
    """Centres of energy and widths per layer (mm / 100): what Flow II decides (the layer
    energies come from Flow I, which the student shares with the teacher)."""
    values = high_level_features(showers, energies, GEOMETRY).values
    return np.column_stack([v / 100.0 for k, v in values.items()
                            if k.startswith(("EC_", "width_"))])


def test_student_moves_towards_teacher(teacher, data, tmp_path):
    model, run_dir = teacher
    heldout = data.select(slice(0, 500))
    # from a random network, so that all the way comes from the distillation losses
    untrained = CaloFlowStudent.from_teacher(model, _tiny(8, init="random"), run_dir)
    untrained.prepare_fit(data, resume=False, device="cpu")
    trained = CaloFlowStudent.from_teacher(model, _tiny(8, init="random"), run_dir)
    summary = trained.fit(data, str(tmp_path / "student"))
    log = read_log(str(tmp_path / "student" / "train_log.jsonl"))
    # the logged validation figure is the KL estimate used to pick the epoch
    assert summary["best_val_loss"] == min(r["val_loss"] for r in log)
    kl_before = kl_student_teacher(untrained, heldout, seed=1)
    kl_after = kl_student_teacher(trained, heldout, seed=1)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    # and on samples: with the same (seed, shard) noise, the student's showers should be the
    # teacher's; mean L1 distance between paired showers normalised to unit sum
    energies = data.incident_energies[:500]
    theirs = _unit_sum(model.sample(energies, seed=7).showers)
    distance = {name: np.abs(_unit_sum(student.sample(energies, seed=7).showers) - theirs)
                .sum(1).mean() for name, student in (("before", untrained), ("after", trained))}
    assert distance["after"] < 0.5 * distance["before"], distance
    # and on the distribution of shape features (FPD, against independent teacher samples)
    reference = _shape_features(model.sample(energies, seed=8).showers, energies)
    fpds = {name: fpd(reference, _shape_features(student.sample(energies, seed=9).showers,
                                                 energies))[0]
            for name, student in (("before", untrained), ("after", trained))}
    assert fpds["after"] < fpds["before"], fpds


def test_student_shares_flow1_and_round_trips(teacher, data, tmp_path):
    model, run_dir = teacher
    student = CaloFlowStudent.from_teacher(model, _tiny(1), run_dir)
    student.fit(data.select(slice(0, 500)), str(tmp_path / "s"))
    for key, value in model.module.flow1.state_dict().items():
        torch.testing.assert_close(student.module.flow1.state_dict()[key], value)
    loaded = load_model(str(tmp_path / "s"))
    assert isinstance(loaded, CaloFlowStudent) and loaded.teacher is None
    energies = data.incident_energies[:300]
    a = student.sample(energies, seed=2, batch_size=64)
    b = loaded.sample(energies, seed=2, batch_size=300)
    np.testing.assert_allclose(a.showers, b.showers, rtol=1e-4, atol=1e-5)
    # same (seed, shard) noise, same Flow I: the layer energies are the teacher's, up to the
    # voxels each model puts below the threshold
    t = model.sample(energies, seed=2)
    difference = GEOMETRY.layer_energies(a.showers) - GEOMETRY.layer_energies(t.showers)
    assert np.abs(difference).max() <= max(GEOMETRY.layer_sizes) * student.config.threshold_mev
    assert np.isfinite(a.showers).all() and (a.showers >= 0).all()
    kept = a.showers[a.showers > 0]
    assert kept.size == 0 or kept.min() >= student.config.threshold_mev
    with pytest.raises(Exception, match="from its teacher"):
        loaded.fit(data, str(tmp_path / "again"))


def test_distillation_resume_matches_uninterrupted(teacher, data, tmp_path):
    model, run_dir = teacher
    data = data.select(slice(0, 500))
    reference = CaloFlowStudent.from_teacher(model, _tiny(3), run_dir)
    reference.fit(data, str(tmp_path / "full"))
    interrupted = CaloFlowStudent.from_teacher(model, _tiny(3), run_dir)
    with killed_after_epoch(1), pytest.raises(Killed):
        interrupted.fit(data, str(tmp_path / "cut"))
    resumed = load_model(str(tmp_path / "cut"))
    resumed.attach_teacher(model, run_dir)
    resumed.fit(data, str(tmp_path / "cut"), resume=True)
    assert [r["epoch"] for r in read_log(str(tmp_path / "cut" / "train_log.jsonl"))] == [1, 2, 3]
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value)


def test_distill_generate_bench_cli(teacher, data, tmp_path, capsys):
    model, run_dir = teacher
    train = tmp_path / "train.h5"
    write_showers(train, data.select(slice(0, 500)), GEOMETRY)
    student_dir = tmp_path / "student"
    assert main(["distill", run_dir, "-o", str(student_dir), "--data", str(train), "--preset",
                 "tiny", "--epochs", "1", "--no-progress"]) == 0
    assert "KL(student||teacher)" in capsys.readouterr().out
    assert main(["distill", run_dir, "-o", str(student_dir), "--data", str(train), "--epochs",
                 "2", "--resume", "--no-progress"]) == 0
    assert len(read_log(str(student_dir / "train_log.jsonl"))) == 2
    out = tmp_path / "gen.h5"
    assert main(["generate", str(student_dir), "-n", "50", "-o", str(out), "--threads", "1",
                 "--no-progress"]) == 0
    assert main(["bench-sampling", str(student_dir), "--threads", "1", "--batch-sizes", "1,20",
                 "--repeats", "2", "-o", str(tmp_path / "bench.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ms/shower" in printed and "caloflow-student" in printed
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["threads"], r["batch_size"]) for r in rows] == [(1, 1), (1, 20)]
    assert all(r["ms_per_shower"] > 0 and r["repeats"] == 2 for r in rows)


def test_distill_cli_bad_inputs(teacher, data, tmp_path, capsys):
    model, run_dir = teacher
    train = tmp_path / "train.h5"
    write_showers(train, data.select(slice(0, 200)), GEOMETRY)
    base = ["distill", run_dir, "--data", str(train), "--preset", "tiny", "--epochs", "1",
            "--no-progress"]
    # a student of another shape cannot be matched block by block
    config = tmp_path / "small.yaml"
    config.write_text("student: {blocks: 1}\n")
    assert main(base + ["-o", str(tmp_path / "a"), "--config", str(config)]) == 1
    assert "guided" in capsys.readouterr().err
    config.write_text("student: {blocks: 1, hidden: [16]}\nguided: false\ninit: auto\n")
    assert main(base + ["-o", str(tmp_path / "b"), "--config", str(config)]) == 0
    capsys.readouterr()
    # init: auto falls back to a random network for a student of another shape
    assert load_model(str(tmp_path / "b")).distillation.init == "random"
    # a student is not a teacher
    assert main(["distill", str(tmp_path / "b"), "-o", str(tmp_path / "c"), "--data",
                 str(train), "--no-progress"]) == 1
    assert "has no student" in capsys.readouterr().err
    # resuming with another teacher
    other = CaloFlow(GEOMETRY, CaloFlow.preset("tiny"))
    other.config.training.epochs = 1
    other.fit(data.select(slice(0, 300)), str(tmp_path / "other"))
    assert main(["distill", str(tmp_path / "other"), "-o", str(tmp_path / "b"), "--data",
                 str(train), "--resume", "--no-progress"]) == 1
    assert "not the teacher" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
    # the teacher records no training file (it was given none): --data is needed
    assert main(["distill", str(tmp_path / "other"), "-o", str(tmp_path / "d"),
                 "--no-progress"]) == 1
    assert "--data" in capsys.readouterr().err
    config.write_text("beta: 2\n")
    assert main(base + ["-o", str(tmp_path / "e"), "--config", str(config)]) == 1
    assert "beta" in capsys.readouterr().err
    for text, message in (("init: copy\n", "init must be"),
                          ("init: teacher\nguided: false\nstudent: {hidden: [16]}\n",
                           "teacher's architecture")):
        config.write_text(text)
        assert main(base + ["-o", str(tmp_path / "f"), "--config", str(config)]) == 1
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "f")


def test_student_initialised_from_teacher_starts_closer(teacher, data):
    model, run_dir = teacher
    heldout = data.select(slice(0, 500))
    kl = {}
    for init in ("random", "auto"):
        student = CaloFlowStudent.from_teacher(model, _tiny(1, init=init), run_dir)
        student.prepare_fit(data, resume=False, device="cpu")
        kl[init] = kl_student_teacher(student, heldout, seed=1)
    # each block starts as (nearly) the inverse of the teacher's block it imitates
    assert student.distillation.init == "teacher"  # auto: same architecture
    assert kl["auto"] < 0.5 * kl["random"], kl
    for ours, theirs in zip(student.module.flow2.transform.transforms,
                            model.module.flow2.transform.transforms):
        torch.testing.assert_close(ours.transform.hyper[0].weight, theirs.hyper[0].weight)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 10), st.floats(1.0, 20.0))
def test_fast_spline_equals_zuko(seed, bins, bound):
    # float64: in the spline's flattest parts (slope down to 1e-3) float32 rounding of the
    # knots is amplified a thousandfold by the inverse
    generator = torch.Generator().manual_seed(seed)
    options = {"generator": generator, "dtype": torch.float64}
    widths, heights = (3 * torch.randn(50, bins, **options) for _ in range(2))
    derivatives = 3 * torch.randn(50, bins - 1, **options)
    x = bound * 1.2 * (2 * torch.rand(50, **options) - 1)
    ours = RQSpline(widths, heights, derivatives, bound=bound)
    zukos = MonotonicRQSTransform(widths, heights, derivatives, bound=bound)
    y, ladj = ours.call_and_ladj(x)
    y_ref, ladj_ref = zukos.call_and_ladj(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10 * bound)
    torch.testing.assert_close(ladj, ladj_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.inv(y), zukos.inv(y), rtol=1e-8, atol=1e-8 * bound)
    torch.testing.assert_close(ours.inv(y), x, rtol=1e-6, atol=1e-6 * bound)
    # the gathered inverse is zuko's inverse over all knots, to the last bit, gradients too
    params = [p.clone().requires_grad_() for p in (widths, heights, derivatives)]
    fresh = RQSpline(*params, bound=bound)
    gathered = fresh._inverse(y)
    over_all_knots = MonotonicRQSTransform._inverse(fresh, y)
    assert torch.equal(gathered, over_all_knots)
    for left, right in zip(torch.autograd.grad(gathered.sum(), params, retain_graph=True),
                           torch.autograd.grad(over_all_knots.sum(), params), strict=True):
        torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-12)
    # one spline's knots for a batch of values (broadcast as zuko does)
    many = y[None, :].expand(3, 50) * torch.tensor([[0.5], [1.0], [1.5]], dtype=torch.float64)
    torch.testing.assert_close(fresh._inverse(many).detach(),
                               MonotonicRQSTransform._inverse(fresh, many).detach(),
                               rtol=0, atol=0)
    # at the knots themselves, the bounds and beyond them (identity outside)
    edges = torch.cat([fresh.vertical.detach()[:, ::max(bins // 3, 1)].T,
                       torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=torch.float64)[:, None]
                       * bound * torch.ones(1, 50, dtype=torch.float64)])
    assert torch.equal(fresh._inverse(edges), MonotonicRQSTransform._inverse(fresh, edges))
    with torch.inference_mode():  # the in-place constructor and the binary search
        quick = RQSpline(widths, heights, derivatives, bound=bound)
        assert torch.equal(quick.vertical, fresh.vertical.detach())
        for values in [y, *edges]:  # at the knots too: searchsorted counts the knots < y
            assert torch.equal(quick._inverse(values),
                               MonotonicRQSTransform._inverse(quick, values))
