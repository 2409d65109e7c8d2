"""Model families on one interface (:class:`~caloforge.models.base.ShowerModel`)."""

from __future__ import annotations

from typing import Any

from ..errors import CaloforgeError
from ..geometry import Geometry
from ..registry import FAMILIES
from .base import ShowerModel, load_weights, read_model_json


def families() -> dict[str, Any]:
    """Family name -> model class, for every family of :data:`caloforge.registry.FAMILIES`
    (imported on call: torch and zuko are heavy)."""
    return {name: family.model_class() for name, family in FAMILIES.items()}


def load_model(directory: str) -> ShowerModel:
    """Load a saved model (``model.json`` and the weights file it names) of any family."""
    description = read_model_json(directory)
    family = description.get("family")
    if family not in FAMILIES:
        raise CaloforgeError(f"{directory}: unknown model family {family!r}")
    try:
        geometry = Geometry.from_dict(description["geometry"])
        model = FAMILIES[family].model_class().from_json_state(description["state"], geometry)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CaloforgeError(f"{directory}: malformed model description ({exc!r})") from None
    model.training_summary = description.get("training", {})
    load_weights(model, directory, description)
    return model


__all__ = ["ShowerModel", "families", "load_model"]
