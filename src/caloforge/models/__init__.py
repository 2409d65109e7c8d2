"""Model families on one interface (:class:`~caloforge.models.base.ShowerModel`)."""

from __future__ import annotations

from typing import Any

from ..errors import CaloforgeError
from ..geometry import Geometry
from .base import ShowerModel, load_weights, read_model_json


def families() -> dict[str, Any]:
    """Family name -> model class (imported lazily: torch and zuko are heavy)."""
    from .calogan import CaloGan
    from .caloflow import CaloFlow
    from .caloflow_student import CaloFlowStudent
    from .convflow import ConvL2LFlow
    from .icaloflow import ICaloFlow, ICaloFlowStudent
    from .wgan import Wgan

    return {"caloflow": CaloFlow, "caloflow-student": CaloFlowStudent, "calogan": CaloGan,
            "wgan": Wgan, "icaloflow": ICaloFlow, "icaloflow-student": ICaloFlowStudent,
            "convflow": ConvL2LFlow}


# families trained from data by `caloforge train` (a student is distilled from a teacher)
TRAINABLE_FAMILIES = ("caloflow", "icaloflow", "convflow", "calogan", "wgan")
# teacher family -> the family of its distilled student (`caloforge distill`)
STUDENT_FAMILIES = {"caloflow": "caloflow-student", "icaloflow": "icaloflow-student"}


def load_model(directory: str) -> ShowerModel:
    """Load a saved model (``model.json`` + ``model.safetensors``) of any family."""
    description = read_model_json(directory)
    family = description.get("family")
    classes = families()
    if family not in classes:
        raise CaloforgeError(f"{directory}: unknown model family {family!r}")
    try:
        geometry = Geometry.from_dict(description["geometry"])
        model = classes[family].from_json_state(description["state"], geometry)
    except (KeyError, TypeError, ValueError) as exc:
        raise CaloforgeError(f"{directory}: malformed model description ({exc!r})") from None
    model.training_summary = description.get("training", {})
    load_weights(model, directory)
    return model


__all__ = ["STUDENT_FAMILIES", "ShowerModel", "TRAINABLE_FAMILIES", "families", "load_model"]
