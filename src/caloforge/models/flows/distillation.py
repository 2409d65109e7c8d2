"""Probability density distillation of MAF teachers into one-pass IAF students.

A MAF teacher samples with one network pass per autoregressive group and block; its
inverse-autoregressive twin (:func:`~caloforge.models.flows.toolkit.build_maf` with
``inverse=True``) samples in one pass per block. A student learns from a trained teacher,
never from data alone (CaloFlow II):

* x-space loss: the teacher maps (preprocessed) data x -> z, the student maps z -> x-hat;
  mean squared error to x.
* z-space loss: the student maps fresh z ~ N(0, 1) -> x, the (frozen) teacher maps it back
  -> z-hat; mean squared error to z.
* "fully guided" (``guided: true``, needs the teacher's block count and bins): both losses
  also match every intermediate block output and every block's spline parameters.
* loss = beta * x-space + (1 - beta) * z-space (published: beta = 0.5).

The epoch is selected by a Monte-Carlo estimate of KL(student || teacher) on the held-out
split (student samples scored by both densities, both in their one-pass direction).

:class:`DistilledStudent` is the part every student family shares: it is mixed into a
teacher family whose flows named in ``distilled_flows`` are built inverse-autoregressive;
the teacher family provides ``_distillation_inputs(batch, generator)`` (flow name ->
(flow input x, context)). Flows not distilled (the few-feature layer-energy flow, whose
sequential passes are negligible) are copied from the teacher and frozen.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch.nn.functional import mse_loss
from zuko.utils import unpack

from ...data import ShowerData
from ...errors import CaloforgeError, OptionError
from ...training import TrainingConfig, config_from_dict
from ..base import recorded_weights_sha256
from .toolkit import FlowConfig


@dataclass
class DistillationConfig:
    """How to distil: the student flows' architecture, the loss mix, the optimisation.

    ``student`` overrides the teacher's settings of each distilled flow (``blocks``,
    ``hidden``, ``bins``, ``bound``, ``passes``); empty = the teacher's architecture.
    """

    student: dict[str, Any] = field(default_factory=dict)
    beta: float = 0.5
    guided: bool = True
    # "teacher": each student block starts from the weights of the teacher block it
    # imitates (same architecture needed; calochallenge-1 photons, 30 minutes: KL 24.9
    # against 100 nats from a random start, low-level AUC 0.649 against 0.846). "random":
    # a fresh network (the published recipe). "auto": teacher when the architectures
    # match, else random.
    init: str = "auto"
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        epochs=1000, batch_size=256, learning_rate=1e-3, time_budget_s=30 * 60))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillationConfig:
        out: DistillationConfig = config_from_dict(cls, values, "distillation")
        out.student = dict(out.student or {})  # ``student:`` left empty in a YAML file
        bad = sorted(set(out.student) - set(asdict(FlowConfig())))
        if bad:
            raise OptionError(f"unknown student option(s) {bad}; known: "
                              f"{sorted(asdict(FlowConfig()))}")
        if not 0.0 <= out.beta <= 1.0:
            raise OptionError(f"beta must be in [0, 1], got {out.beta}")
        if out.init not in ("auto", "random", "teacher"):
            raise OptionError(f"init must be auto, random or teacher, got {out.init!r}")
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


# --- block chains --------------------------------------------------------------------------
def _block(made: Any, h: torch.Tensor, context: torch.Tensor, with_ladj: bool = False
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


def teacher_chain(flow: Any, x: torch.Tensor, context: torch.Tensor
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A teacher MAF in its density direction x -> z, one pass per block.

    Returns the states ``[h_0 = x, h_1, ..., h_B = z]`` and the spline parameters of each
    block ``[phi_1 .. phi_B]`` (``phi_i`` computed from ``h_{i-1}``)."""
    states, params = [x], []
    for made in flow.transform.transforms:
        phi, h, _ = _block(made, states[-1], context)
        states.append(h)
        params.append(phi)
    return states, params


def student_chain(flow: Any, z: torch.Tensor, context: torch.Tensor,
                  with_ladj: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """A student IAF in its sampling direction z -> x, one pass per block.

    Returns the states ``[h_0 = x, ..., h_B = z]`` (indexed like the teacher's), the spline
    parameters ``[phi_1 .. phi_B]`` (``phi_i`` computed from ``h_i``) and, if asked,
    log|det dx/dz| ``(N,)``."""
    blocks = [lazy_inverse.transform for lazy_inverse in flow.transform.transforms]
    states: list[torch.Tensor] = [z]
    params: list[torch.Tensor] = []
    ladjs = []
    for made in reversed(blocks):
        phi, h, ladj = _block(made, states[0], context, with_ladj)
        states.insert(0, h)
        params.insert(0, phi)
        ladjs.append(ladj)
    if not with_ladj:
        return states, params, None
    total_ladj = torch.zeros(len(z), device=z.device)
    for ladj in ladjs:
        assert ladj is not None
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


def distillation_loss(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor,
                      context: torch.Tensor, generator: torch.Generator,
                      config: DistillationConfig) -> torch.Tensor:
    """beta * x-space + (1 - beta) * z-space loss of one flow; ``x`` ``(N, D)`` in the
    flow's space, ``context`` ``(N, C)``."""
    guided, beta = config.guided, config.beta
    loss = torch.zeros((), device=x.device)
    if beta > 0:
        with torch.no_grad():
            states, params = teacher_chain(teacher, x, context)
        ours, our_params, _ = student_chain(student, states[-1], context)
        loss = loss + beta * _chain_mismatch(states, ours, params, our_params, 0, guided)
    if beta < 1:
        z = torch.randn(x.shape, generator=generator).to(x.device)
        ours, our_params, _ = student_chain(student, z, context)
        states, params = teacher_chain(teacher, ours[0], context)
        loss = loss + (1 - beta) * _chain_mismatch(ours, states, our_params, params, -1, guided)
    return loss


def kl_divergence(teacher: torch.nn.Module, student: torch.nn.Module, shape: torch.Size,
                  context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample ``(N,)`` one-draw estimate of KL(student || teacher) in nats:
    log q_student(x) - log p_teacher(x) at x sampled from the student."""
    z = torch.randn(shape, generator=generator).to(context.device)
    states, _, ladj = student_chain(student, z, context, with_ladj=True)
    log_q = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - ladj
    return log_q - teacher(context).log_prob(states[0])


class DistilledStudent:
    """Mixin for a student family: ``class Student(DistilledStudent, TeacherFamily)``.

    The student *is* a model of the teacher's family whose ``distilled_flows`` are inverse
    autoregressive (``inverse_autoregressive = True``), so preprocessing, sampling and
    files are the teacher family's code and generation never special-cases a student. The
    teacher family provides ``_distillation_inputs(batch, generator, every_layer)`` (flow
    name -> (input, context); ``every_layer`` for validation where training subsamples).
    """

    teacher_family: ClassVar[str]
    distilled_flows: ClassVar[tuple[str, ...]]
    inverse_autoregressive = True
    # one-pass inverse splines: measured ~1.3 kB per (shower x voxel) at peak (368 voxels)
    bytes_per_shower_voxel = 1.5e3
    # A distillation step (x- and z-space chains with gradients, guided) holds ~16.5 kB per
    # distilled input value with 6 blocks of 8 bins (calochallenge-3 iCaloFlow, 64 showers
    # x 12 layers of 900 voxels: 11.6 GB). Batches above the budget are split into
    # micro-batches whose gradients accumulate (TrainingConfig.micro_batch_size).
    step_bytes_per_value_and_block = 2.75e3
    step_memory_budget = 3e9
    distillation: DistillationConfig
    teacher: Any
    teacher_info: dict[str, Any]
    module: Any
    config: Any
    geometry: Any
    family: ClassVar[str]

    def __init__(self, geometry: Any, config: Any = None,
                 distillation: DistillationConfig | None = None) -> None:
        super().__init__(geometry, config)  # type: ignore[call-arg]
        self.distillation = distillation or DistillationConfig()
        self.teacher = None
        self.teacher_info = {}

    PRESETS: ClassVar[dict[str, Callable[[], Any]]] = DISTILLATION_PRESETS

    @classmethod
    def from_teacher(cls, teacher: Any, distillation: DistillationConfig,
                     teacher_dir: str | None = None) -> Any:
        """An untrained student sharing the teacher's preprocessing and other flows."""
        if getattr(teacher, "family", None) != cls.teacher_family or teacher.module is None:
            raise CaloforgeError(f"a {cls.family} is distilled from a trained "
                                 f"{cls.teacher_family} teacher (got a "
                                 f"{getattr(teacher, 'family', '?')!r} model)")
        flows: dict[str, Any] = {}
        same_architecture = True
        for name in cls.distilled_flows:
            theirs = getattr(teacher.config, name)
            try:
                ours = FlowConfig(**{**asdict(theirs), **distillation.student})
            except TypeError as exc:
                raise OptionError(f"bad student options: {exc}") from None
            if distillation.guided and (ours.blocks, ours.bins) != (theirs.blocks, theirs.bins):
                raise OptionError(
                    f"fully guided distillation matches block by block: the student needs the "
                    f"teacher's blocks ({theirs.blocks}) and bins ({theirs.bins}); set "
                    "'guided: false' for a student of another shape")
            same_architecture = same_architecture and ours == theirs
            if distillation.init == "teacher" and ours != theirs:
                raise OptionError(
                    f"init: teacher copies the teacher's {name} weights: the student needs the "
                    f"teacher's architecture ({asdict(theirs)}); use init: random")
            flows[name] = asdict(ours)
        if distillation.init == "auto":  # the run records what was done
            distillation = replace(distillation,
                                   init="teacher" if same_architecture else "random")
        config = type(teacher.config).from_dict({**teacher.config.to_dict(), **flows,
                                                 "training": asdict(distillation.training)})
        state = {**teacher.to_json_state(), "config": config.to_dict(),
                 "distillation": distillation.to_dict(), "teacher": {}}
        student = cls.from_json_state(state, teacher.geometry)
        student.teacher = teacher
        student.teacher_info = {
            name: asdict(getattr(teacher.config, name)) for name in cls.distilled_flows}
        student.teacher_info["best_val_loss"] = teacher.training_summary.get("best_val_loss")
        if teacher_dir is not None:
            student.teacher_info["run_dir"] = os.path.abspath(teacher_dir)
            student.teacher_info["weights_sha256"] = recorded_weights_sha256(teacher_dir)
        return student

    def attach_teacher(self, teacher: Any, teacher_dir: str) -> None:
        """Re-attach the teacher to a saved student (to resume its distillation)."""
        recorded = self.teacher_info.get("weights_sha256")
        if recorded and recorded != recorded_weights_sha256(teacher_dir):
            raise CaloforgeError(f"{teacher_dir}: not the teacher this student was distilled "
                                 "from (its weights differ)")
        self.teacher = teacher

    # --- distillation -----------------------------------------------------------------
    def prepare_fit(self, data: ShowerData, resume: bool, device: str) -> None:
        if self.teacher is None:
            raise CaloforgeError("a student is trained from its teacher: use "
                                 f"{type(self).__name__}.from_teacher (caloforge distill)")
        teacher_module = self.teacher.module
        if not resume:
            self._build_module()  # type: ignore[attr-defined]
            for name, flow in self.module.named_children():
                if name not in self.distilled_flows:
                    flow.load_state_dict(getattr(teacher_module, name).state_dict())
                elif self.distillation.init == "teacher":
                    # a student block wraps its network in a lazy inverse (``.transform``)
                    for ours, theirs in zip(flow.transform.transforms,
                                            getattr(teacher_module, name).transform.transforms):
                        ours.transform.load_state_dict(theirs.state_dict())
        self._require_module()  # type: ignore[attr-defined]
        for name, flow in self.module.named_children():
            if name not in self.distilled_flows:
                flow.requires_grad_(False)
        teacher_module.to(device).eval().requires_grad_(False)
        training = self.config.training
        if training.micro_batch_size is None:
            showers = self._showers_per_step_budget(data)
            if showers < training.batch_size:
                training.micro_batch_size = showers

    def _showers_per_step_budget(self, data: ShowerData) -> int:
        """Showers whose distillation step fits ``step_memory_budget`` (from the distilled
        flows' input size per shower, probed on one training shower)."""
        probe = self.to_tensors(data, slice(0, 1))  # type: ignore[attr-defined]
        inputs = self._distillation_inputs(  # type: ignore[attr-defined]
            probe, torch.Generator().manual_seed(0))
        values = sum(inputs[name][0].numel() for name in self.distilled_flows)
        blocks = max(getattr(self.config, name).blocks for name in self.distilled_flows)
        per_shower = values * blocks * self.step_bytes_per_value_and_block
        return max(1, int(self.step_memory_budget // per_shower))

    def _flow_pairs(self) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
        return [(name, getattr(self.teacher.module, name), getattr(self.module, name))
                for name in self.distilled_flows]

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Sum over the distilled flows of their distillation losses."""
        inputs = self._distillation_inputs(batch, generator)  # type: ignore[attr-defined]
        return _total([distillation_loss(teacher, student, inputs[name][0], inputs[name][1],
                                         generator, self.distillation)
                       for name, teacher, student in self._flow_pairs()])

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                        ) -> torch.Tensor:
        """KL(student || teacher) of the distilled flows in nats per shower (one student
        sample per held-out context)."""
        inputs = self._distillation_inputs(  # type: ignore[attr-defined]
            batch, generator, every_layer=True)
        n_showers = len(batch["incident_energy"])
        return _total([kl_divergence(teacher, student, inputs[name][0].shape, inputs[name][1],
                                     generator).sum() / n_showers
                       for name, teacher, student in self._flow_pairs()])

    # --- persistence ------------------------------------------------------------------
    def to_json_state(self) -> dict[str, Any]:
        return {**super().to_json_state(),  # type: ignore[misc]
                "distillation": self.distillation.to_dict(), "teacher": self.teacher_info}

    @classmethod
    def from_json_state(cls, state: dict[str, Any], geometry: Any) -> Any:
        model = super().from_json_state(state, geometry)  # type: ignore[misc]
        model.distillation = DistillationConfig.from_dict(state["distillation"])
        model.teacher_info = dict(state.get("teacher", {}))
        return model


def _total(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of one or more tensors."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def kl_student_teacher(student: Any, data: ShowerData, seed: int = 0, device: str = "cpu",
                       batch_size: int = 1024) -> float:
    """KL(student || teacher) estimate (nats per shower) over the contexts of ``data``."""
    tensors = student.to_tensors(data)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in tensors.items()}
            total += float(student.validation_loss(batch, generator)) * len(
                batch["incident_energy"])
    return total / max(len(data), 1)
