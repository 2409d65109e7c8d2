"""The CaloFlow student: Flow II distilled into an inverse autoregressive flow (CaloFlow II).

A MAF teacher samples with one network pass per autoregressive group and block; its
inverse-autoregressive twin (:func:`~caloforge.models.caloflow.build_maf` with
``inverse=True``) samples in one pass per block. The student is trained by probability
density distillation from a trained teacher, never from data alone:

* x-space loss: the teacher maps (preprocessed) data x -> z, the student maps z -> x-hat;
  mean squared error to x.
* z-space loss: the student maps fresh z ~ N(0, 1) -> x, the (frozen) teacher maps it back
  -> z-hat; mean squared error to z.
* "fully guided" (``guided: true``, needs the teacher's block count and bins): both losses
  also match every intermediate block output and every block's spline parameters.
* loss = beta * x-space + (1 - beta) * z-space (published: beta = 0.5).

The epoch is selected by a Monte-Carlo estimate of KL(student || teacher) on the held-out
split (student samples scored by both densities; both in their one-pass direction).
Flow I (layer energies, a few features) is copied from the teacher unchanged: its
sequential passes are negligible next to Flow II's at any batch size above one.

Everything else (preprocessing, sampling, files) is the teacher's code: the student *is* a
:class:`~caloforge.models.caloflow.CaloFlow` whose Flow II is inverse autoregressive, so
``caloforge generate`` and ``caloforge evaluate`` treat it like any other model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn.functional import mse_loss
from zuko.utils import unpack

from ..data import ShowerData
from ..errors import CaloforgeError, OptionError
from ..geometry import Geometry
from ..training import TrainingConfig
from .base import MODEL_WEIGHTS
from .caloflow import CaloFlow, CaloFlowConfig, FlowConfig


@dataclass
class DistillationConfig:
    """How to distil: the student's Flow II architecture, the loss mix, the optimisation.

    ``student`` overrides the teacher's Flow II settings (``blocks``, ``hidden``, ``bins``,
    ``bound``, ``passes``); empty = the teacher's architecture.
    """

    student: dict[str, Any] = field(default_factory=dict)
    beta: float = 0.5
    guided: bool = True
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        epochs=1000, batch_size=256, learning_rate=1e-3, time_budget_s=30 * 60))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillationConfig":
        values = dict(values)
        known = {"student", "beta", "guided", "training"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionError(f"unknown distillation option(s) {unknown}; known: {sorted(known)}")
        out = cls()
        if "student" in values:
            student = dict(values["student"] or {})
            bad = sorted(set(student) - {f for f in asdict(FlowConfig())})
            if bad:
                raise OptionError(f"unknown student option(s) {bad}; known: "
                                  f"{sorted(asdict(FlowConfig()))}")
            out.student = student
        if "beta" in values:
            out.beta = float(values["beta"])
        if "guided" in values:
            out.guided = bool(values["guided"])
        if "training" in values:
            out.training = TrainingConfig.from_dict({**asdict(out.training), **values["training"]})
        if not 0.0 <= out.beta <= 1.0:
            raise OptionError(f"beta must be in [0, 1], got {out.beta}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_distillation() -> DistillationConfig:
    """The teacher's architecture, fully guided, 30 minutes on 2 CPU cores."""
    return DistillationConfig()


def _tiny_distillation() -> DistillationConfig:
    """For tests: seconds on a CPU."""
    return DistillationConfig(training=TrainingConfig(epochs=2, batch_size=32, learning_rate=3e-3))


DISTILLATION_PRESETS = {"cpu": _cpu_distillation, "tiny": _tiny_distillation}


def _block(made: torch.nn.Module, h: torch.Tensor, context: torch.Tensor, with_ladj: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One MADE-spline block in its one-pass direction.

    ``h``: ``(N, D)``; ``context``: ``(N, C)``. Returns the raw spline parameters
    ``(N, D * P)``, the output ``(N, D)`` and, if asked, log|det J| ``(N,)``.
    """
    phi = made.hyper(torch.cat([h, context], dim=-1))
    spline = made.univariate(*unpack(phi.unflatten(-1, (-1, made.total)), made.shapes))
    if not with_ladj:
        return phi, spline(h), None
    out, ladj = spline.call_and_ladj(h)
    return phi, out, ladj.sum(-1)


def teacher_chain(flow: torch.nn.Module, x: torch.Tensor, context: torch.Tensor
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher Flow II in its density direction x -> z, one pass per block.

    Returns the states ``[h_0 = x, h_1, ..., h_B = z]`` and the spline parameters of each
    block ``[phi_1 .. phi_B]`` (``phi_i`` computed from ``h_{i-1}``)."""
    states, params = [x], []
    for made in flow.transform.transforms:
        phi, h, _ = _block(made, states[-1], context)
        states.append(h)
        params.append(phi)
    return states, params


def student_chain(flow: torch.nn.Module, z: torch.Tensor, context: torch.Tensor,
                  with_ladj: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Student Flow II in its sampling direction z -> x, one pass per block.

    Returns the states ``[h_0 = x, ..., h_B = z]`` (indexed like the teacher's), the spline
    parameters ``[phi_1 .. phi_B]`` (``phi_i`` computed from ``h_i``) and, if asked,
    log|det dx/dz| ``(N,)``."""
    blocks = [lazy_inverse.transform for lazy_inverse in flow.transform.transforms]
    states: list[torch.Tensor] = [z]
    params: list[torch.Tensor] = []
    total_ladj = torch.zeros(len(z), device=z.device) if with_ladj else None
    for made in reversed(blocks):
        phi, h, ladj = _block(made, states[0], context, with_ladj)
        states.insert(0, h)
        params.insert(0, phi)
        if with_ladj:
            total_ladj = total_ladj + ladj
    return states, params, total_ladj


def _chain_mismatch(reference: list[torch.Tensor], estimate: list[torch.Tensor],
                    reference_params: list[torch.Tensor], estimate_params: list[torch.Tensor],
                    end: int, guided: bool) -> torch.Tensor:
    """MSE at the chain's end (state index ``end``), plus every intermediate state and every
    block's spline parameters when guided."""
    loss = mse_loss(estimate[end], reference[end])
    if guided:
        for i in range(1, len(reference) - 1):
            loss = loss + mse_loss(estimate[i], reference[i])
        for ours, theirs in zip(estimate_params, reference_params):
            loss = loss + mse_loss(ours, theirs)
    return loss


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CaloFlowStudent(CaloFlow):
    """A CaloFlow whose Flow II is an inverse autoregressive flow distilled from a teacher.

    Example::

        teacher = load_model("runs/teacher")
        student = CaloFlowStudent.from_teacher(teacher, CaloFlowStudent.preset("cpu"),
                                               teacher_dir="runs/teacher")
        student.fit(train_data, "runs/student")
        generated = student.sample(reference.incident_energies, seed=1)
    """

    family = "caloflow-student"
    inverse_autoregressive = True
    # one-pass inverse splines: measured ~1.3 kB per (shower x voxel) at peak (368 voxels)
    bytes_per_shower_voxel = 1.5e3

    def __init__(self, geometry: Geometry, config: CaloFlowConfig | None = None,
                 distillation: DistillationConfig | None = None) -> None:
        super().__init__(geometry, config)
        self.distillation = distillation or DistillationConfig()
        self.teacher: CaloFlow | None = None
        self.teacher_info: dict[str, Any] = {}

    @staticmethod
    def preset(name: str) -> DistillationConfig:  # type: ignore[override]
        if name not in DISTILLATION_PRESETS:
            raise OptionError(f"unknown distillation preset {name!r}; choose from "
                              f"{', '.join(DISTILLATION_PRESETS)}")
        return DISTILLATION_PRESETS[name]()

    @classmethod
    def from_teacher(cls, teacher: CaloFlow, distillation: DistillationConfig,
                     teacher_dir: str | None = None) -> "CaloFlowStudent":
        """An untrained student sharing the teacher's preprocessing and Flow I."""
        if type(teacher) is not CaloFlow or teacher.module is None:
            raise CaloforgeError("a student is distilled from a trained CaloFlow teacher "
                                 f"(got a {teacher.family!r} model)")
        try:
            flow2 = FlowConfig(**{**asdict(teacher.config.flow2), **distillation.student})
        except TypeError as exc:
            raise OptionError(f"bad student options: {exc}") from None
        theirs = teacher.config.flow2
        if distillation.guided and (flow2.blocks, flow2.bins) != (theirs.blocks, theirs.bins):
            raise OptionError(
                f"fully guided distillation matches block by block: the student needs the "
                f"teacher's blocks ({theirs.blocks}) and bins ({theirs.bins}); set "
                "'guided: false' for a student of another shape")
        config = CaloFlowConfig.from_dict({**teacher.config.to_dict(), "flow2": asdict(flow2),
                                           "training": asdict(distillation.training)})
        state = {**teacher.to_json_state(), "config": config.to_dict(),
                 "distillation": distillation.to_dict(), "teacher": {}}
        student = cls.from_json_state(state, teacher.geometry)
        student.teacher = teacher
        student.teacher_info = {"flow2": asdict(theirs),
                                "best_val_loss": teacher.training_summary.get("best_val_loss")}
        if teacher_dir is not None:
            student.teacher_info["run_dir"] = os.path.abspath(teacher_dir)
            student.teacher_info["weights_sha256"] = file_sha256(
                os.path.join(teacher_dir, MODEL_WEIGHTS))
        return student

    def attach_teacher(self, teacher: CaloFlow, teacher_dir: str) -> None:
        """Re-attach the teacher to a saved student (to resume its distillation)."""
        recorded = self.teacher_info.get("weights_sha256")
        if recorded and recorded != file_sha256(os.path.join(teacher_dir, MODEL_WEIGHTS)):
            raise CaloforgeError(f"{teacher_dir}: not the teacher this student was distilled "
                                 "from (its weights differ)")
        self.teacher = teacher

    # --- distillation -----------------------------------------------------------------
    def _prepare_fit(self, data: ShowerData, resume: bool, device: str) -> None:
        if self.teacher is None:
            raise CaloforgeError("a student is trained from its teacher: use "
                                 "CaloFlowStudent.from_teacher (caloforge distill)")
        teacher_module = self.teacher.module
        assert teacher_module is not None
        if not resume:
            self._build_module()
            assert self.module is not None
            self.module.flow1.load_state_dict(teacher_module.flow1.state_dict())
        self._require_module()
        assert self.module is not None
        self.module.flow1.requires_grad_(False)
        teacher_module.to(device).eval().requires_grad_(False)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """beta * x-space + (1 - beta) * z-space distillation loss (mean squared errors)."""
        assert self.module is not None and self.teacher is not None
        teacher_flow, student_flow = self.teacher.module.flow2, self.module.flow2
        _, _, context2, x2 = self._flow_inputs(batch, generator)
        guided, beta = self.distillation.guided, self.distillation.beta
        loss = torch.zeros((), device=x2.device)
        if beta > 0:
            with torch.no_grad():
                states, params = teacher_chain(teacher_flow, x2, context2)
            ours, our_params, _ = student_chain(student_flow, states[-1], context2)
            loss = loss + beta * _chain_mismatch(states, ours, params, our_params, 0, guided)
        if beta < 1:
            z = torch.randn(x2.shape, generator=generator).to(x2.device)
            ours, our_params, _ = student_chain(student_flow, z, context2)
            states, params = teacher_chain(teacher_flow, ours[0], context2)
            loss = loss + (1 - beta) * _chain_mismatch(ours, states, our_params, params, -1,
                                                       guided)
        return loss

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                        ) -> torch.Tensor:
        """KL(student || teacher) of Flow II in nats per shower, estimated with one student
        sample per held-out context: mean of log q_student(x) - log p_teacher(x)."""
        assert self.module is not None and self.teacher is not None
        _, _, context2, x2 = self._flow_inputs(batch, generator)
        z = torch.randn(x2.shape, generator=generator).to(x2.device)
        states, _, ladj = student_chain(self.module.flow2, z, context2, with_ladj=True)
        base = torch.distributions.Normal(0.0, 1.0)
        log_q = base.log_prob(z).sum(-1) - ladj
        log_p = self.teacher.module.flow2(context2).log_prob(states[0])
        return (log_q - log_p).mean()

    # --- persistence ------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {**super().to_json_state(), "distillation": self.distillation.to_dict(),
                "teacher": self.teacher_info}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Geometry | None = None
                        ) -> "CaloFlowStudent":
        model = super().from_json_state(state, geometry)
        assert isinstance(model, CaloFlowStudent)
        model.distillation = DistillationConfig.from_dict(state["distillation"])
        model.teacher_info = dict(state.get("teacher", {}))
        return model


def kl_student_teacher(student: CaloFlowStudent, data: ShowerData, seed: int = 0,
                       device: str = "cpu", batch_size: int = 1024) -> float:
    """KL(student || teacher) estimate (nats per shower) over the contexts of ``data``."""
    tensors = student._tensors(data)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in tensors.items()}
            total += float(student.validation_loss(batch, generator)) * len(
                batch["incident_energy"])
    return total / max(len(data), 1)


__all__ = ["CaloFlowStudent", "DistillationConfig", "DISTILLATION_PRESETS",
           "kl_student_teacher"]
