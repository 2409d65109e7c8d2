"""The CaloFlow student: Flow II distilled into an inverse autoregressive flow (CaloFlow II).

Distillation (losses, epoch selection by KL(student || teacher)) is
:mod:`caloforge.models.distillation`; Flow I (layer energies, a few features) is copied from
the teacher unchanged: its sequential passes are negligible next to Flow II's at any batch
size above one. The student *is* a :class:`~caloforge.models.caloflow.CaloFlow` whose Flow
II is inverse autoregressive, so ``caloforge generate`` and ``caloforge evaluate`` treat it
like any other model.
"""

from __future__ import annotations

import torch

from .caloflow import CaloFlow
from .distillation import (DISTILLATION_PRESETS, DistillationConfig, DistilledStudent,
                           kl_student_teacher)


class CaloFlowStudent(DistilledStudent, CaloFlow):
    """A CaloFlow whose Flow II is an inverse autoregressive flow distilled from a teacher.

    Example::

        teacher = load_model("runs/teacher")
        student = CaloFlowStudent.from_teacher(teacher, CaloFlowStudent.preset("cpu"),
                                               teacher_dir="runs/teacher")
        student.fit(train_data, "runs/student")
        generated = student.sample(reference.incident_energies, seed=1)
    """

    family = "caloflow-student"
    teacher_family = "caloflow"
    distilled_flows = ("flow2",)

    def _distillation_inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                             every_layer: bool = False
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        _, _, context2, x2 = self._flow_inputs(batch, generator)
        return {"flow2": (x2, context2)}


__all__ = ["CaloFlowStudent", "DistillationConfig", "DISTILLATION_PRESETS",
           "kl_student_teacher"]
