"""Every registered family through the same checks (as zuko's tests run every flow):
fit -> files -> load -> sample reproducibly per (seed, shard) -> resume -> log_prob ->
export (ONNX run by onnxruntime, TorchScript by torch.jit.load) where the family exports.

A family registered in :data:`caloforge.registry.FAMILIES` is tested here without a line
added; a student is distilled from its teacher, trained here the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from caloforge.data import ShowerData
from caloforge.errors import CaloforgeError
from caloforge.export import EXPORT_FORMATS, export_model, relative_deviation, run_onnx
from caloforge.geometry import CartesianLayer, Geometry
from caloforge.models import load_model
from caloforge.models.base import ShowerModel, shard_generator, weights_path
from caloforge.registry import FAMILIES
from caloforge.training import read_log

from conftest import Killed, killed_after_epoch, random_showers

# four Cartesian layers of 8 x 8 cells: a geometry every family accepts (the WGAN critic
# halves the grid three times)
GEOMETRY = Geometry("conformance-8x8x4", tuple(
    CartesianLayer(i, nx=8, ny=8, dx=5.0, dy=5.0) for i in range(4)), threshold_mev=0.01)
EPOCHS = 2


@pytest.fixture(scope="module")
def data() -> ShowerData:
    return random_showers(GEOMETRY, 300, seed=11)


def new_model(name: str, teachers: dict[str, tuple[ShowerModel, str]]) -> ShowerModel:
    """An untrained model of family ``name`` (tiny preset, ``EPOCHS`` epochs); a student
    from its trained teacher."""
    family = FAMILIES[name]
    model_class = family.model_class()
    config = model_class.preset("tiny")
    config.training.epochs = EPOCHS
    if family.teacher is None:
        return model_class(GEOMETRY, config)
    teacher, teacher_dir = teachers[family.teacher]
    return model_class.from_teacher(teacher, config, teacher_dir=teacher_dir)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict[str, Any]:
    """Family name -> (model, run directory), trained once per module (teachers first)."""
    runs: dict[str, Any] = {}
    for name in sorted(FAMILIES, key=lambda n: FAMILIES[n].teacher is not None):
        run_dir = str(tmp_path_factory.mktemp(name))
        model = new_model(name, runs)
        model.fit(data, run_dir)
        runs[name] = (model, run_dir)
    return runs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fit_writes_a_complete_run(name, trained):
    model, run_dir = trained[name]
    files = {p.name for p in Path(run_dir).iterdir()}
    assert {"model.json", Path(weights_path(run_dir)).name, "checkpoint.safetensors",
            "train_log.jsonl", "loss_curve.png"} <= files
    log = read_log(str(Path(run_dir) / "train_log.jsonl"))
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(r["val_loss"]) for r in log)
    assert model.training_summary["epochs"] == EPOCHS


@pytest.mark.parametrize("name", list(FAMILIES))
def test_load_gives_the_same_model(name, trained, data):
    model, run_dir = trained[name]
    loaded = load_model(run_dir)
    assert type(loaded) is type(model) and loaded.family == name
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)
    energies = data.incident_energies[:40]
    np.testing.assert_array_equal(model.sample(energies, seed=5).showers,
                                  loaded.sample(energies, seed=5).showers)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_is_reproducible_per_seed_and_shard(name, trained, data):
    model, _ = trained[name]
    energies = data.incident_energies[:40]
    first = model.sample(energies, seed=3, shard=1)
    assert first.showers.shape == (40, GEOMETRY.n_voxels)
    assert np.isfinite(first.showers).all() and (first.showers >= 0).all()
    np.testing.assert_array_equal(first.incident_energies, energies)
    np.testing.assert_array_equal(first.showers, model.sample(energies, seed=3, shard=1).showers)
    # the noise of a shard is drawn up front: another batch size changes only the rounding
    again = model.sample(energies, seed=3, shard=1, batch_size=7)
    np.testing.assert_allclose(again.showers, first.showers, rtol=1e-4, atol=1e-4)
    other_shard = model.sample(energies, seed=3, shard=2)
    assert not np.array_equal(first.showers, other_shard.showers)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(name, trained, data, tmp_path):
    model, _ = trained[name]
    teachers = {n: trained[n] for n in trained if FAMILIES[n].teacher is None}
    interrupted = new_model(name, teachers)
    with killed_after_epoch(1), pytest.raises(Killed):
        interrupted.fit(data, str(tmp_path))
    resumed = load_model(str(tmp_path))
    teacher = FAMILIES[name].teacher
    if teacher is not None:
        resumed.attach_teacher(*teachers[teacher])
    resumed.fit(data, str(tmp_path), resume=True)
    log = read_log(str(tmp_path / "train_log.jsonl"))
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_log_prob_where_the_family_has_a_likelihood(name, trained, data):
    model, _ = trained[name]
    sample = data.select(slice(0, 30))
    if not model.has_likelihood:
        with pytest.raises(CaloforgeError, match="no likelihood"):
            model.log_prob(sample)
        return
    values = model.log_prob(sample)
    assert values.shape == (30,) and np.isfinite(values).all()
    np.testing.assert_array_equal(values, model.log_prob(sample))


@pytest.mark.parametrize("format", EXPORT_FORMATS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_exported_graph_draws_the_models_showers(name, format, trained, data, tmp_path):
    """Fed the noise ``sample`` draws for a seed, the exported graph gives the showers
    ``sample`` gives, at batch sizes other than the one it was traced at."""
    model, _ = trained[name]
    output = str(tmp_path / ("model.onnx" if format == "onnx" else "model.pt"))
    if not FAMILIES[name].exports:
        with pytest.raises(CaloforgeError, match="cannot be exported"):
            export_model(model, output, format)
        assert not Path(output).exists()
        return
    description = export_model(model, output, format)
    assert description["check"]["max_relative_deviation"] <= 1e-4
    if format == "onnx" and model.noise_steps:  # exported step by step, then joined
        import onnx
        from onnx import numpy_helper

        stored = [(i.data_type, tuple(i.dims), numpy_helper.to_array(i).tobytes())
                  for i in onnx.load(output).graph.initializer]
        assert len(set(stored)) == len(stored)  # a flow every step shares is stored once
    energies = data.incident_energies[:37]
    noise = model.draw_noise(len(energies), shard_generator(6, 0)).numpy()
    inputs = np.concatenate([noise, energies[:, None]], axis=1).astype(np.float32)
    assert inputs.shape[1] == description["layout"]["input"]["shape"][1]
    expected = model.sample(energies, seed=6).showers
    for rows in (slice(0, 1), slice(0, 37)):
        if format == "onnx":
            produced = run_onnx(output, inputs[rows])
        else:
            with torch.no_grad():
                produced = torch.jit.load(output)(torch.from_numpy(inputs[rows])).numpy()
        assert produced.shape == expected[rows].shape
        assert relative_deviation(produced, expected[rows]) <= 1e-4
