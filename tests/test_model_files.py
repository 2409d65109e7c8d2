"""Corrupt model files: one clear line naming the file and the problem, non-zero exit, no
traceback, nothing written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from caloforge.atomic import file_sha256
from caloforge.cli import main
from caloforge.geometry import get_geometry
from caloforge.models.base import weights_path

from conftest import train_tiny_caloflow

GEOMETRY = get_geometry("calogan")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    return train_tiny_caloflow(tmp_path_factory.mktemp("run"), GEOMETRY, 200, seed=3)


def _edit_json(run_dir: Path, change) -> Path:
    path = run_dir / "model.json"
    description = json.loads(path.read_text())
    path.write_text(json.dumps(change(description)))
    return path


def _edit_weights(run_dir: Path, change, record: bool = True) -> Path:
    """Change the weights; ``record``: also record their new digest in model.json (a
    consistent pair whose weights are bad), else leave model.json describing the old ones
    (a save killed between the two files)."""
    path = Path(weights_path(str(run_dir)))
    tensors = load_file(str(path))
    save_file(change(tensors), str(path))
    if record:
        _record_digest(run_dir)
    return path


def _record_digest(run_dir: Path) -> None:
    _edit_json(run_dir, lambda x: {**x, "weights_sha256": file_sha256(
        weights_path(str(run_dir)))})


def _truncate_weights(run_dir: Path) -> Path:
    path = Path(weights_path(str(run_dir)))
    path.write_bytes(path.read_bytes()[:200])
    _record_digest(run_dir)
    return path


def _scaled_weights(tensors):
    return {k: v * 2 if v.is_floating_point() else v for k, v in tensors.items()}


def _first_float(tensors: dict) -> str:
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)


def _nan_weight(tensors):
    name = _first_float(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    return tensors


def _double_weight(tensors):
    name = _first_float(tensors)
    tensors[name] = tensors[name].double()
    return tensors


def _missing_weight(tensors):
    tensors.pop(_first_float(tensors))
    return tensors


CASES = {
    "json is a list": (lambda d: _edit_json(d, lambda x: [x]), "JSON object, got list"),
    "family is a list": (lambda d: _edit_json(d, lambda x: {**x, "family": ["caloflow"]}),
                         "'family' must be a JSON str"),
    "unknown family": (lambda d: _edit_json(d, lambda x: {**x, "family": "vae"}),
                       "unknown model family 'vae'"),
    "no geometry": (lambda d: _edit_json(d, lambda x: {k: v for k, v in x.items()
                                                       if k != "geometry"}),
                    "lacks 'geometry'"),
    "future format": (lambda d: _edit_json(d, lambda x: {**x, "format_version": 99}),
                      "format version 99"),
    "state without config": (lambda d: _edit_json(d, lambda x: {**x, "state": {}}),
                             "malformed model description"),
    "not JSON": (lambda d: (d / "model.json").write_text("{not json") and d / "model.json",
                 "unreadable model description"),
    "NaN weight": (lambda d: _edit_weights(d, _nan_weight), "NaN or infinite"),
    "float64 weight": (lambda d: _edit_weights(d, _double_weight),
                       "is torch.float64, the model needs torch.float32"),
    "missing weight": (lambda d: _edit_weights(d, _missing_weight), "do not match"),
    "truncated weights": (_truncate_weights, "unreadable or truncated"),
    "weights of another save": (lambda d: _edit_weights(d, _scaled_weights, record=False),
                                "not the weights model.json describes"),
    "digest not a string": (lambda d: _edit_json(d, lambda x: {**x, "weights_sha256": 5}),
                            "'weights_sha256' must be a JSON str"),
    "weights outside the run": (lambda d: _edit_json(d, lambda x: {
        **x, "weights": "../model-0123456789abcdef.safetensors"}), "must name a model-"),
    "weights file gone": (lambda d: Path(weights_path(str(d))).unlink(), "missing model weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_model_files_are_refused_cleanly(case, saved_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    corrupt, pattern = CASES[case]
    corrupt(run_dir)
    out = tmp_path / "generated.h5"
    status = main(["generate", str(run_dir), "-n", "3", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(run_dir) in err and re.search(pattern, err), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_intact_model_loads(saved_run, tmp_path):
    out = tmp_path / "generated.h5"
    assert main(["generate", str(saved_run), "-n", "3", "-o", str(out)]) == 0
    assert out.exists()


def test_a_save_killed_before_its_manifest_leaves_the_previous_model(saved_run, tmp_path,
                                                                      monkeypatch):
    """New weights are written under a new name; until model.json (the manifest) is renamed
    into place the previous model is what loads, and the next save removes the orphan."""
    import torch

    from caloforge.models import base, load_model

    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    previous = load_model(str(run_dir))
    changed = load_model(str(run_dir))
    with torch.no_grad():
        for parameter in changed.module.parameters():
            parameter.add_(1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment between the weights and the manifest

    monkeypatch.setattr(base, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        changed.save(str(run_dir))
    monkeypatch.undo()
    assert len(list(run_dir.glob("model-*.safetensors"))) == 2  # the orphan is there
    loaded = load_model(str(run_dir))
    for key, value in previous.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value)
    changed.save(str(run_dir))
    assert [p.name for p in run_dir.glob("model-*.safetensors")] == \
        [Path(weights_path(str(run_dir))).name]
    for key, value in changed.module.state_dict().items():
        torch.testing.assert_close(load_model(str(run_dir)).module.state_dict()[key], value)
