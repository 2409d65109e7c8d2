"""The recipes shipped in configs/ (``caloforge train FAMILY --config configs/F-G.yaml``):
each file is read as `train` reads it, over the `cpu` preset, and builds a model of its
family for its geometry (a wrong option, value or geometry mismatch is an OptionError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from caloforge.cli import build_config
from caloforge.geometry import get_geometry
from caloforge.registry import get_family

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_the_recipes_are_there():
    assert {path.stem for path in CONFIGS} >= {"convflow-ild-ecal", "convflow-calochallenge-3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_each_recipe_builds_its_model(path):
    family_name, geometry_name = path.stem.split("-", 1)
    model_class = get_family(family_name).model_class()
    config = build_config(model_class, "cpu", str(path))
    model = model_class(get_geometry(geometry_name), config)
    assert model.config.layer_energy == "deposited"  # what every convflow recipe rests on
    assert config.training == model_class.preset("cpu").training  # sizes stay the preset's
