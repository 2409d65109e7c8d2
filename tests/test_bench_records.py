"""The benchmark scripts' results files: runs side by side each keep their figures."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from pipeline import update_json  # noqa: E402
from time_to_fidelity import record_stage  # noqa: E402


def _add_stages(path: str, key: str, minutes: list[int]) -> None:
    for stage_min in minutes:
        update_json(path, lambda data, m=stage_min: record_stage(
            data, key, "family", "geometry", {"stage_min": m}))


def test_time_to_fidelity_runs_side_by_side_keep_every_stage(tmp_path):
    """Two drivers writing the same results file (as two lines measured at once do) lose
    nothing: each stage is merged into the file as it is on disk, under a lock."""
    path = str(tmp_path / "ttf.json")
    update_json(path, lambda data: record_stage(data, "old", "f", "g", {"stage_min": 120}))
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_add_stages, args=(path, key, list(range(40))))
               for key in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    lines = json.load(open(path))["lines"]
    assert {key: sorted(s["stage_min"] for s in line["stages"]) for key, line in lines.items()} \
        == {"old": [120], "a": list(range(40)), "b": list(range(40))}


def test_recording_a_stage_again_replaces_it():
    results: dict = {}
    record_stage(results, "k", "f", "g", {"stage_min": 30, "auc": 0.9})
    record_stage(results, "k", "f", "g", {"stage_min": 30, "auc": 0.8})
    assert results["lines"]["k"]["stages"] == [{"stage_min": 30, "auc": 0.8}]


@pytest.mark.parametrize("broken", ["{", "[1, 2"])
def test_a_corrupt_results_file_is_not_overwritten(tmp_path, broken):
    path = tmp_path / "ttf.json"
    path.write_text(broken)
    with pytest.raises(json.JSONDecodeError):
        update_json(str(path), lambda data: None)
    assert path.read_text() == broken


def test_simulator_comparison_records_facts_per_label(tmp_path, monkeypatch):
    """bench/hepemshow/compare_simulator.py on a small stand-in for the G4HepEm file (here
    the simulator's own showers): every target measure is recorded under its label, and a
    second label keeps the first."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "hepemshow"))
    import compare_simulator

    from caloforge.data import ShowerData, write_showers
    from caloforge.geometry import get_geometry

    rng = np.random.default_rng(5)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 400))
    reference = tmp_path / "g4.h5"
    write_showers(reference, ShowerData(energies, compare_simulator.simulate_like(energies, 9)),
                  get_geometry("hepemshow-pbwo4-lar"))
    results = tmp_path / "cmp.json"
    for label in ("before", "after"):
        monkeypatch.setattr(sys, "argv", [
            "compare_simulator.py", "--reference", str(reference), "--work", str(tmp_path),
            "--label", label, "--facts-only", "--results", str(results)])
        compare_simulator.main()
    recorded = json.load(open(results))
    assert list(recorded) == ["before", "after"]
    measures = recorded["after"]["measures"]
    assert set(compare_simulator.TARGETS) - {"auc_high", "auc_low"} <= set(measures)
    # the same simulator against itself: the visible fraction agrees to its statistics
    assert measures["worst_visible_fraction_rel"] < 0.03
