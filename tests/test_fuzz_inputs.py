"""Fuzzed input boundary (hypothesis): malformed shower files, model descriptions and config
files are answered with a result or one clean error line, never a traceback, and never a
changed target. The suite runs a bounded number of cases; `bench/fuzz.py` runs more."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caloforge.cli import main
from caloforge.geometry import get_geometry

GEOMETRY = get_geometry("calogan")  # 504 voxels in three layers


def fuzz(examples: int) -> settings:
    """``examples`` cases per test in the suite; CALOFORGE_FUZZ_SCALE multiplies them
    (`bench/fuzz.py` runs with a large scale)."""
    scale = float(os.environ.get("CALOFORGE_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None,
                    suppress_health_check=list(HealthCheck))

KEYS = st.sampled_from(["incident_energies", "showers", "energy", "layer_0", "layer_1",
                        "layer_2", "overflow", "conditions/entry_point", "junk"])
DTYPES = st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.float16, bool])
SPECIAL = st.sampled_from([0.0, -1.0, np.nan, np.inf, -np.inf, 1e3, 1e30, 5e-324])


@st.composite
def shower_files(draw):
    """A dict key -> array: valid, nearly valid or nonsense."""
    n = draw(st.integers(0, 6))
    content = {}
    for key in draw(st.lists(KEYS, min_size=0, max_size=5, unique=True)):
        shape = draw(st.sampled_from([(n,), (n, 1), (n, 504), (n, 503), (n + 1, 1), (n, 3, 96),
                                      (n, 12, 12), (n, 12, 6), (n, 3), ()]))
        values = np.abs(np.random.default_rng(draw(st.integers(0, 99))).normal(
            100.0, 50.0, shape))
        if values.size and draw(st.booleans()):
            values.flat[draw(st.integers(0, values.size - 1))] = draw(SPECIAL)
        with np.errstate(invalid="ignore", over="ignore"):
            content[key] = values.astype(draw(DTYPES))
    return content


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue().strip()


def _assert_clean(status: int, err: str) -> None:
    assert status in (0, 1), (status, err)
    assert "Traceback" not in err
    if status:
        assert len(err.splitlines()) == 1 and "error:" in err, err


@fuzz(40)
@given(content=shower_files(), truncate=st.booleans())
def test_fuzzed_shower_files(tmp_path_factory, content, truncate):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "input.h5"
    with h5py.File(path, "w") as h5:
        for key, values in content.items():
            h5[key] = values
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    target = folder / "out.h5"
    target.write_bytes(b"previous")
    for argv in (["inspect", str(path)], ["inspect", str(path), "--geometry", "calogan"],
                 ["convert", str(path), "--geometry", "calogan", "-o", str(target)]):
        status, err = _run(argv)
        _assert_clean(status, err)
        if status:
            assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in folder.iterdir()) in (["input.h5", "out.h5"],)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    from conftest import train_tiny_caloflow

    return train_tiny_caloflow(tmp_path_factory.mktemp("run"), GEOMETRY, 150, seed=2)


@fuzz(20)
@given(field=st.sampled_from(["family", "geometry", "state", "training", "format_version",
                              "weights_sha256", "versions", None]),
       value=JSON_VALUES, drop=st.booleans())
def test_fuzzed_model_descriptions(saved_run, tmp_path_factory, field, value, drop):
    import shutil

    run_dir = tmp_path_factory.mktemp("fuzzrun") / "run"
    shutil.copytree(saved_run, run_dir)
    path = run_dir / "model.json"
    description = json.loads(path.read_text())
    if field is None:
        description = value
    elif drop:
        description.pop(field, None)
    else:
        description[field] = value
    path.write_text(json.dumps(description))
    target = run_dir.parent / "gen.h5"
    status, err = _run(["generate", str(run_dir), "-n", "2", "-o", str(target)])
    _assert_clean(status, err)
    assert status == 0 or not target.exists()


@fuzz(12)
@given(config=JSON_VALUES)
def test_fuzzed_config_files(tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("fuzzcfg")
    data = folder / "train.h5"
    if not data.exists():
        from caloforge.data import write_showers

        from conftest import random_showers

        write_showers(data, random_showers(GEOMETRY, 40, seed=1), GEOMETRY)
    config_file = folder / "c.yaml"
    config_file.write_text(json.dumps({"training": {"epochs": 1}, "flow2": config}))
    status, err = _run(["train", "caloflow", "--data", str(data), "--geometry", "calogan",
                        "--preset", "tiny", "--config", str(config_file), "-o",
                        str(folder / "run"), "--epochs", "1", "--no-progress"])
    _assert_clean(status, err)
