"""The model families caloforge offers, in one place.

Every part of caloforge that needs to know which families exist (the CLI's choices and help,
``load_model``, ``caloforge distill``, the conformance test, the docs) reads :data:`FAMILIES`.
Adding a family is one :class:`Family` entry here plus its module (see CONTRIBUTING.md).

Importing this module is cheap: a family's class (torch, zuko) is imported only when
:meth:`Family.model_class` is called.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import OptionError


@dataclass(frozen=True)
class Family:
    """A model family: where its class lives and what the CLI needs to know about it."""

    name: str
    module: str          # import path of the module defining the class
    class_name: str
    summary: str         # one line: what it is and where it fits
    presets: tuple[str, ...]
    # a distilled student: the family it is distilled from (``caloforge distill``); None: a
    # family trained from data (``caloforge train``)
    teacher: str | None = None
    # ``caloforge train`` options only this family takes (dest names of the CLI options)
    train_options: tuple[str, ...] = ()
    # ``caloforge export`` writes it as an ONNX / TorchScript graph (noise + conditions ->
    # showers in one pass); else why not, for the error message
    exports: bool = False
    not_exported_because: str = ""

    @property
    def trainable(self) -> bool:
        """Trained from data by ``caloforge train`` (a student is distilled instead)."""
        return self.teacher is None

    def model_class(self) -> Any:
        """The family's :class:`~caloforge.models.base.ShowerModel` subclass."""
        return getattr(importlib.import_module(self.module), self.class_name)


_FLOWS, _GANS = "caloforge.models.flows", "caloforge.models.gans"
FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("caloflow", f"{_FLOWS}.caloflow", "CaloFlow",
           "two normalising flows (layer energies, then voxels); <~1000 voxels",
           ("cpu", "paper", "tiny"),
           not_exported_because="its voxel flow samples autoregressively (one network pass "
                                "per voxel); distil it (caloforge distill) and export the "
                                "one-pass student"),
    Family("caloflow-student", f"{_FLOWS}.caloflow", "CaloFlowStudent",
           "CaloFlow II: Flow II distilled into a one-pass inverse autoregressive flow",
           ("cpu", "tiny"), teacher="caloflow", exports=True),
    Family("icaloflow", f"{_FLOWS}.icaloflow", "ICaloFlow",
           "layer-to-layer flows for many voxels: calochallenge-2/3, ild-ecal",
           ("cpu", "paper", "tiny"), train_options=("postprocess",),
           not_exported_because="its layer flows sample autoregressively; distil it "
                                "(caloforge distill) and export the student"),
    Family("icaloflow-student", f"{_FLOWS}.icaloflow", "ICaloFlowStudent",
           "iCaloFlow's layer flows distilled into one-pass students",
           ("cpu", "tiny"), teacher="icaloflow", exports=True),
    Family("convflow", f"{_FLOWS}.convflow", "ConvL2LFlow",
           "convolutional layer-to-layer flows (U-Net couplings) for image layers: ild-ecal, "
           "calochallenge-3", ("cpu", "paper", "tiny"), train_options=("layers", "postprocess"),
           exports=True),
    Family("calogan", f"{_GANS}.calogan", "CaloGan",
           "CaloGAN-style GAN for layered Cartesian geometries", ("cpu", "tiny"),
           exports=True),
    Family("wgan", f"{_GANS}.wgan", "Wgan",
           "conditional WGAN-GP with a Box-Cox representation, e.g. lhcb-ecal",
           ("cpu", "tiny"), exports=True),
)}


def get_family(name: str) -> Family:
    """The registered family ``name`` (an OptionError listing the families otherwise)."""
    if name not in FAMILIES:
        raise OptionError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def trainable_families() -> list[str]:
    """Names of the families ``caloforge train`` trains from data."""
    return [name for name, family in FAMILIES.items() if family.trainable]


def student_of(teacher: str) -> Family | None:
    """The student family distilled from ``teacher``, or None."""
    return next((f for f in FAMILIES.values() if f.teacher == teacher), None)
