"""`caloforge export` from the command line: both formats side by side, the unit and
normalisation options, timing the ONNX graph, and clean refusals (a family that cannot
export, a changed graph file). The agreement of every exporting family with ``sample`` is
checked in tests/test_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caloforge.cli import main
from caloforge.data import write_showers
from caloforge.export import example_inputs, export_description_path, layout_for, run_onnx
from caloforge.geometry import get_geometry
from caloforge.models import load_model

from conftest import random_showers, train_tiny_caloflow

GEOMETRY = get_geometry("calogan")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gan")
    data = folder / "train.h5"
    write_showers(str(data), random_showers(GEOMETRY, 300, seed=4), GEOMETRY)
    run_dir = folder / "run"
    assert main(["train", "calogan", "--data", str(data), "--geometry", GEOMETRY.name, "-o",
                 str(run_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
                 "--no-progress"]) == 0
    return run_dir


def test_both_formats_side_by_side_and_timed(gan_run, tmp_path, capsys):
    onnx_file, torchscript_file = tmp_path / "gan.onnx", tmp_path / "gan.pt"
    assert main(["export", str(gan_run), "-o", str(onnx_file)]) == 0
    assert main(["export", str(gan_run), "--format", "torchscript", "-o",
                 str(torchscript_file)]) == 0
    for path, format in ((onnx_file, "onnx"), (torchscript_file, "torchscript")):
        description = json.loads(Path(export_description_path(str(path))).read_text())
        assert description["format"] == format and description["file"] == path.name
        latent = load_model(str(gan_run)).config.latent_dim
        assert description["layout"]["input"]["shape"] == ["batch", latent + 1]  # noise, E
        assert description["layout"]["output"]["shape"] == ["batch", GEOMETRY.n_voxels]
    capsys.readouterr()
    assert main(["bench-sampling", str(onnx_file), "--threads", "1", "--batch-sizes", "1,8",
                 "--repeats", "1", "--no-progress"]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    rows = json.loads(Path(str(onnx_file) + ".sampling_benchmark.json").read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 8] and all(r["ms_per_shower"] > 0
                                                             for r in rows)


def test_units_and_normalisation_follow_the_options(gan_run, tmp_path):
    model = load_model(str(gan_run))
    inputs = example_inputs(model, layout_for(model), 20, seed=5)  # energies in MeV
    plain = tmp_path / "mev.onnx"
    assert main(["export", str(gan_run), "-o", str(plain)]) == 0
    showers = run_onnx(str(plain), inputs)
    energies = inputs[:, -1]

    gev = tmp_path / "gev.onnx"
    assert main(["export", str(gan_run), "--units", "GeV", "-o", str(gev)]) == 0
    in_gev = inputs.copy()
    in_gev[:, -1] /= 1000.0
    np.testing.assert_allclose(run_onnx(str(gev), in_gev), showers / 1000.0, rtol=1e-4,
                               atol=1e-7)

    par04 = tmp_path / "par04.onnx"
    e_max = 2.0 * float(energies.max())
    assert main(["export", str(gan_run), "--normalise-by-einc", "--input-energy-max",
                 str(e_max), "-o", str(par04)]) == 0
    scaled = inputs.copy()
    scaled[:, -1] /= e_max
    np.testing.assert_allclose(run_onnx(str(par04), scaled), showers / energies[:, None],
                               rtol=1e-4, atol=1e-9)


def test_a_family_that_samples_autoregressively_is_refused(tmp_path, capsys):
    run_dir = train_tiny_caloflow(tmp_path / "teacher", get_geometry("calochallenge-1-photons"),
                                  200, seed=2)
    target = tmp_path / "teacher.onnx"
    assert main(["export", str(run_dir), "-o", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be exported" in err and "distil" in err
    assert not target.exists() and not Path(export_description_path(str(target))).exists()


@pytest.mark.parametrize("option", [["--units", "keV"], ["--input-energy-max", "-3"],
                                    ["--format", "tflite"]])
def test_invalid_options_are_one_line(gan_run, tmp_path, capsys, option):
    target = tmp_path / "m.onnx"
    try:
        status = main(["export", str(gan_run), "-o", str(target), *option])
    except SystemExit as exc:  # argparse's own choice check: usage line, exit 2
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status != 0 and "Traceback" not in err and not target.exists()


def test_a_changed_graph_file_is_refused(gan_run, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    assert main(["export", str(gan_run), "-o", str(target)]) == 0
    target.write_bytes(target.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["bench-sampling", str(target), "--threads", "1", "--batch-sizes", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the file" in err


def test_a_wgan_conditioned_on_entry_point_and_angles_exports(tmp_path):
    """lhcb-ecal's WGAN moves its image to the entry point (AffineGrid: ONNX opset 20);
    the condition columns follow the energy in the graph's input."""
    geometry = get_geometry("lhcb-ecal")
    data = tmp_path / "lhcb.h5"
    write_showers(str(data), random_showers(geometry, 300, seed=6, conditions=True), geometry)
    run_dir = tmp_path / "wgan"
    assert main(["train", "wgan", "--data", str(data), "--geometry", geometry.name, "-o",
                 str(run_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
                 "--no-progress"]) == 0
    target = tmp_path / "wgan.onnx"
    assert main(["export", str(run_dir), "-o", str(target)]) == 0
    description = json.loads(Path(export_description_path(str(target))).read_text())
    columns = description["layout"]["input"]["columns"]
    assert [c.split(": ")[1].split(" (")[0] for c in columns[2:]] == ["direction", "entry_point"]
    assert description["check"]["max_relative_deviation"] <= 1e-4


def test_agreement_forgives_only_voxels_rounded_across_the_cut():
    from caloforge.export import agreement

    expected = np.array([[50.0, 0.0750001, 0.0, 3.0], [20.0, 0.08, 0.0, 0.0]], dtype=np.float32)
    produced = expected.copy()
    produced[0, 1] = 0.0  # the shower's smallest kept voxel, rounded below the cut
    assert agreement(produced, expected) == (0.0, 1)
    produced[1, 2] = 5.0  # a bright voxel one graph makes and the other does not: a bug
    deviation, flips = agreement(produced, expected)
    assert deviation == pytest.approx(5.0 / 20.0) and flips == 1
