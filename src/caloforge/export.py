"""Export a trained generator as one graph for an experiment's simulation: ONNX (Geant4's
Par04 example and Key4hep's DDML with ONNX Runtime) or TorchScript (DDML with LibTorch).

The graph is the family's :meth:`~caloforge.models.base.ConditionedModel.showers_from_noise`
traced (for families that split it into steps, each step exported on its own and the
graphs joined), so it computes what ``caloforge generate`` computes for the same noise. It has one
float32 input and one float32 output, both with a dynamic batch axis:

* ``inputs`` ``(B, n_noise + 1 + n_condition_columns)``: standard-normal noise, then the
  incident energy (in ``units``; divided by ``input_energy_max`` when that is given, Par04's
  E / E_max), then the extra conditions (e.g. lhcb-ecal's entry point in mm and direction in
  rad), in the order and units ``<output>.export.json`` lists;
* ``showers`` ``(B, n_voxels)``: the voxel energies in ``units`` (divided by the incident
  energy with ``normalise_by_einc``, Par04's convention), flat in the geometry's voxel order
  (layer by layer; within a layer radial bin-major for cylindrical layers, row-major y, x
  for Cartesian ones), zero below the readout threshold.

The layout is written into the ONNX file's metadata (``caloforge.layout``) and into
``<output>.export.json`` beside it (with the geometry, the training range and a digest of the
graph). Every export is checked before it is kept: the exported graph run by onnxruntime (or
``torch.jit.load``) must reproduce the torch model on showers of the training range, every
voxel within 1e-4 of its shower's largest, except the few (at most a millionth) that
float rounding puts on the other side of the readout cut (:func:`cut_flips`; counted in the
description).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .atomic import atomic_output, write_json_atomic
from .errors import CaloforgeError, OptionError
from .registry import get_family

EXPORT_FORMATS = ("onnx", "torchscript")
ENERGY_UNITS = {"MeV": 1.0, "GeV": 1000.0}  # MeV per unit
ONNX_OPSETS = (17, 20)  # tried in order
CHECK_SHOWERS = 256
CHECK_RELATIVE_TOLERANCE = 1e-4
CHECK_FLIP_FRACTION = 1e-6  # voxels allowed to round across the cut (at least one)


@dataclass(frozen=True)
class ExportLayout:
    """What the exported graph's input and output columns mean (see the module docstring).

    ``conditions``: (name, columns, unit) of each extra condition after the incident energy.
    """

    family: str
    geometry: str
    n_noise: int
    conditions: tuple[tuple[str, int, str], ...]
    n_voxels: int
    units: str = "MeV"
    input_energy_max: float | None = None  # in ``units``
    normalise_by_einc: bool = False
    noise: str = "standard normal, independent"

    @property
    def n_inputs(self) -> int:
        return self.n_noise + 1 + sum(columns for _, columns, _ in self.conditions)

    def describe(self) -> dict[str, Any]:
        energy = (f"incident energy / {self.input_energy_max:g} {self.units}"
                  if self.input_energy_max else f"incident energy in {self.units}")
        columns = [f"0-{self.n_noise - 1}: noise ({self.noise})", f"{self.n_noise}: {energy}"]
        start = self.n_noise + 1
        for name, width, unit in self.conditions:
            columns.append(f"{start}-{start + width - 1}: {name} ({unit or 'no unit'})")
            start += width
        output = (f"voxel energy / incident energy ({self.n_voxels} voxels)"
                  if self.normalise_by_einc else
                  f"voxel energies in {self.units} ({self.n_voxels} voxels)")
        return {**asdict(self), "input": {"name": "inputs", "shape": ["batch", self.n_inputs],
                                          "dtype": "float32", "columns": columns},
                "output": {"name": "showers", "shape": ["batch", self.n_voxels],
                           "dtype": "float32", "meaning": output}}


class SamplingGraph(torch.nn.Module):
    """``inputs (B, n_inputs)`` -> ``showers (B, n_voxels)`` for one model (see
    :class:`ExportLayout`)."""

    def __init__(self, model: Any, layout: ExportLayout) -> None:
        super().__init__()
        self.model = model
        self.module = model.module  # registered, so tracing sees the parameters
        self.layout = layout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        noise, batch = self.parse(inputs)
        return self.model.showers_from_noise(noise, batch) * self.output_scale(batch)

    def parse(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The noise ``(B, n_noise)`` and the model's batch of conditions (MeV)."""
        layout = self.layout
        noise = inputs[:, :layout.n_noise]
        energy = inputs[:, layout.n_noise]
        if layout.input_energy_max:
            energy = energy * layout.input_energy_max
        batch = {"incident_energy": energy * ENERGY_UNITS[layout.units]}
        start = layout.n_noise + 1
        for name, width, _ in layout.conditions:
            batch[f"condition.{name}"] = inputs[:, start:start + width]
            start += width
        return noise, batch

    def output_scale(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 1)``: MeV -> the output's unit (or fraction of the incident energy)."""
        if self.layout.normalise_by_einc:
            return torch.reciprocal(batch["incident_energy"][:, None])
        return torch.full_like(batch["incident_energy"][:, None],
                               1.0 / ENERGY_UNITS[self.layout.units])


class _PrologueGraph(SamplingGraph):
    """``inputs`` -> (noise, output scale, the model's prologue state in ``names`` order)."""

    def __init__(self, model: Any, layout: ExportLayout, names: list[str]) -> None:
        super().__init__(model, layout)
        self.names = names

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        noise, batch = self.parse(inputs)
        state = self.model.noise_prologue(noise, batch)
        return (noise, self.output_scale(batch), *(state[name] for name in self.names))


class _StepGraph(torch.nn.Module):
    """(noise, state in ``names`` order) -> (step ``step``'s voxels unless it has none, the
    changed state in ``changed`` order)."""

    def __init__(self, model: Any, step: int, names: list[str], changed: list[str],
                 has_cells: bool) -> None:
        super().__init__()
        self.model, self.module = model, model.module
        self.step, self.names, self.changed, self.has_cells = step, names, changed, has_cells

    def forward(self, noise: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cells, changed = self.model.noise_step(self.step, noise, dict(zip(self.names, state)))
        return ((cells,) if self.has_cells else ()) + tuple(changed[n] for n in self.changed)


def layout_for(model: Any, units: str = "MeV", input_energy_max: float | None = None,
               normalise_by_einc: bool = False) -> ExportLayout:
    """The layout of ``model``'s graph; an error naming the reason if it cannot export."""
    family = get_family(model.family)
    if not family.exports:
        raise CaloforgeError(f"a {model.family} model cannot be exported: "
                             f"{family.not_exported_because}")
    if units not in ENERGY_UNITS:
        raise OptionError(f"--units must be one of {', '.join(ENERGY_UNITS)}, got {units!r}")
    if input_energy_max is not None and not (np.isfinite(input_energy_max)
                                             and input_energy_max > 0):
        raise OptionError(f"--input-energy-max must be a positive energy, got "
                          f"{input_energy_max}")
    conditions = model.conditions
    return ExportLayout(
        family=model.family, geometry=model.geometry.name, n_noise=model.noise_features(),
        conditions=tuple((name, len(conditions.condition_mean[name]),
                          conditions.units.get(name, "")) for name in conditions.names),
        n_voxels=model.geometry.n_voxels, units=units, input_energy_max=input_energy_max,
        normalise_by_einc=normalise_by_einc)


def example_inputs(model: Any, layout: ExportLayout, n: int, seed: int = 0) -> np.ndarray:
    """``(n, n_inputs)`` float32 inputs within the model's training range: fresh noise,
    incident energies drawn from the training spectrum, conditions uniform in their
    training range."""
    rng = np.random.default_rng(seed)
    energies = model.conditions.sample_energies(n, rng) / ENERGY_UNITS[layout.units]
    if layout.input_energy_max:
        energies = energies / layout.input_energy_max
    columns = [rng.standard_normal((n, layout.n_noise)), energies[:, None]]
    for name, width, _ in layout.conditions:
        low, high = (np.asarray(v, dtype=np.float64).reshape(width)
                     for v in model.conditions.condition_range[name])
        columns.append(rng.uniform(low, high, (n, width)))
    return np.concatenate(columns, axis=1).astype(np.float32)


def export_model(model: Any, output: str, format: str = "onnx", units: str = "MeV",
                 input_energy_max: float | None = None, normalise_by_einc: bool = False,
                 run_dir: str | None = None) -> dict[str, Any]:
    """Write ``model``'s sampling graph to ``output`` (``format``: onnx or torchscript) and
    its description to ``<output>.export.json``; returns the description.

    The graph is checked before it is kept: run by onnxruntime (or reloaded TorchScript) on
    :data:`CHECK_SHOWERS` showers of the training range, it must agree with the torch
    model within :data:`CHECK_RELATIVE_TOLERANCE` (relative to the largest voxel of each
    shower); the agreement is recorded. Nothing is written if it does not."""
    if format not in EXPORT_FORMATS:
        raise OptionError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got "
                          f"{format!r}")
    layout = layout_for(model, units, input_energy_max, normalise_by_einc)
    model.module.cpu()
    graph = SamplingGraph(model, layout).eval()
    trace_inputs = torch.from_numpy(example_inputs(model, layout, 2, seed=1))
    check_inputs = example_inputs(model, layout, CHECK_SHOWERS, seed=2)
    with torch.no_grad():
        expected = graph(torch.from_numpy(check_inputs)).numpy()
    description_path = export_description_path(output)
    with atomic_output(output) as tmp:
        if format == "onnx":
            _write_onnx(graph, trace_inputs, tmp, layout)
            produced = run_onnx(tmp, check_inputs, threads=1)
        else:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's notes on constants and jit
                traced = torch.jit.trace(graph, (trace_inputs,), check_trace=False)
                torch.jit.save(traced, tmp)
            with torch.no_grad():
                produced = torch.jit.load(tmp)(torch.from_numpy(check_inputs)).numpy()
        deviation, flips = agreement(produced, expected)
        if not deviation <= CHECK_RELATIVE_TOLERANCE or flips > max(
                1, CHECK_FLIP_FRACTION * expected.size):
            raise CaloforgeError(f"{output}: the exported graph does not reproduce the model "
                                 f"(largest relative deviation {deviation:.3g}, {flips} "
                                 f"voxels on the other side of the cut, on {CHECK_SHOWERS} "
                                 "showers); nothing written")
        with open(tmp, "rb") as stream:
            digest = hashlib.sha256(stream.read()).hexdigest()
        description = {"format": format, "file": os.path.basename(output), "sha256": digest,
                       "run_dir": os.path.abspath(run_dir) if run_dir else None,
                       "layout": layout.describe(),
                       "geometry": model.geometry.to_dict(),
                       "training_range": {"incident_energy_mev": model.conditions.energy_range,
                                          "conditions": model.conditions.condition_range},
                       "check": {"showers": CHECK_SHOWERS,
                                 "max_relative_deviation": float(deviation),
                                 "cut_flips": flips, "voxels": int(expected.size)}}
        write_json_atomic(description_path, description)
    return description


def export_description_path(output: str) -> str:
    """``model.onnx`` -> ``model.onnx.export.json`` (beside the exported file; one per
    file, so an ONNX and a TorchScript export of the same name do not share one)."""
    return output + ".export.json"


def relative_deviation(produced: np.ndarray, expected: np.ndarray) -> float:
    """The largest |produced - expected| relative to the largest |expected| voxel of the
    same shower (a voxel near zero is compared on the scale of its shower)."""
    scale = np.maximum(np.abs(expected).max(axis=1, keepdims=True), 1e-30)
    return float(np.max(np.abs(produced - expected) / scale)) if expected.size else 0.0


def cut_flips(produced: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """``(B, n_voxels)`` bool: voxels that one output keeps and the other cuts, where the
    kept value is within 0.1 % of the smallest value its shower keeps (the cut). A voxel
    within float rounding of the readout cut lands on either side of it; that is not a
    disagreement of the graphs, and no tolerance on the deviation could absorb it (it
    jumps by the cut)."""
    kept_here, kept_there = produced > 0, expected > 0
    flipped = kept_here != kept_there
    if not flipped.any():
        return flipped
    kept_value = np.where(kept_here, produced, expected)
    smallest = np.where(kept_here | kept_there, kept_value, np.inf).min(axis=1, keepdims=True)
    return flipped & (kept_value <= smallest * (1 + 1e-3))


def agreement(produced: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """(:func:`relative_deviation` over the voxels that are not :func:`cut_flips`, the
    number of cut flips)."""
    flips = cut_flips(produced, expected)
    return relative_deviation(np.where(flips, expected, produced), expected), int(flips.sum())


def _write_onnx(graph: SamplingGraph, trace_inputs: torch.Tensor, path: str,
                layout: ExportLayout) -> None:
    import onnx

    # The TorchScript-based exporter: seconds instead of the dynamo exporter's tens of
    # seconds (which also fails on the flows' data-dependent branches). The lowest opset
    # that holds the graph, for older runtimes in experiments' software stacks: 17
    # (onnxruntime >= 1.14) for flows and CaloGAN, 20 (>= 1.17) where a WGAN moves its
    # image to the entry point (AffineGrid).
    for opset in ONNX_OPSETS:
        try:
            if graph.model.noise_steps:
                _export_in_steps(graph, trace_inputs, path, opset)
            else:
                _export_graph(graph, (trace_inputs,), path, opset, ["inputs"], ["showers"])
            break
        except torch.onnx.errors.UnsupportedOperatorError as exc:
            if opset == ONNX_OPSETS[-1]:
                raise CaloforgeError(f"a {layout.family} model holds an operator ONNX opset "
                                     f"{opset} cannot express ({str(exc).splitlines()[0]})"
                                     ) from None
    exported = onnx.load(path)
    entry = exported.metadata_props.add()
    entry.key, entry.value = "caloforge.layout", json.dumps(layout.describe())
    # the opset the graph needs, for the reader (also in the graph's own opset_import)
    entry = exported.metadata_props.add()
    entry.key, entry.value = "caloforge.opset", str(exported.opset_import[0].version)
    onnx.save(exported, path)


def _export_graph(module: torch.nn.Module, arguments: tuple[torch.Tensor, ...], path: str,
                  opset: int, input_names: list[str], output_names: list[str]) -> None:
    """One module to ONNX, every input and output with a dynamic batch axis."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, arguments, path, input_names=input_names,
                          output_names=output_names, opset_version=opset, dynamo=False,
                          dynamic_axes={name: {0: "batch"}
                                        for name in input_names + output_names})


def _export_in_steps(graph: SamplingGraph, trace_inputs: torch.Tensor, path: str,
                     opset: int) -> None:
    """The model's prologue and each of its steps exported as graphs of their own, then
    joined into one graph (inputs -> showers): a 30-layer ILD convflow took over 16 minutes
    as one graph (unfinished), and about 11 s per layer this way. Steps without cells (the
    energy flow's blocks) only pass state on."""
    import tempfile

    import onnx
    from onnx import TensorProto, compose, helper

    model = graph.model
    with torch.no_grad():
        noise, batch = graph.parse(trace_inputs)
        state = model.noise_prologue(noise, batch)
    names = sorted(state)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as folder:
        part = os.path.join(folder, "part.onnx")
        _export_graph(_PrologueGraph(model, graph.layout, names), (trace_inputs,), part, opset,
                      ["inputs"], ["noise", "output_scale", *names])
        prologue = onnx.load(part)
        nodes = list(prologue.graph.node)
        initializers: list[Any] = []
        shared: dict[tuple[int, tuple[int, ...], str], str] = {}  # content -> initializer
        _add_initializers(prologue.graph, initializers, shared)
        source = {name: name for name in ["noise", *names]}  # state name -> graph value
        cells = []
        for step in range(model.noise_steps):
            with torch.no_grad():
                step_cells, changed = model.noise_step(step, noise, dict(state))
            changed_names = sorted(changed)
            has_cells = step_cells.shape[1] > 0  # the energy flow's steps make no cells
            _export_graph(_StepGraph(model, step, names, changed_names, has_cells),
                          (noise, *(state[name] for name in names)), part, opset,
                          ["noise", *names],
                          ["cells"] * has_cells + [f"new_{n}" for n in changed_names])
            prefix = f"step{step}/"
            piece = compose.add_prefix(onnx.load(part), prefix)
            wiring = {prefix + name: value for name, value in source.items()}
            for node in piece.graph.node:
                node.input[:] = [wiring.get(value, value) for value in node.input]
            _add_initializers(piece.graph, initializers, shared)
            nodes += piece.graph.node
            if has_cells:
                cells.append(prefix + "cells")
            source.update({name: f"{prefix}new_{name}" for name in changed_names})
            state.update(changed)
        nodes += [helper.make_node("Concat", cells, ["voxels_mev"], axis=1),
                  helper.make_node("Mul", ["voxels_mev", "output_scale"], ["showers"])]
        output = helper.make_tensor_value_info("showers", TensorProto.FLOAT,
                                               ["batch", graph.layout.n_voxels])
        joined = helper.make_model(
            helper.make_graph(nodes, "caloforge", list(prologue.graph.input), [output],
                              initializers), opset_imports=list(prologue.opset_import))
        joined.ir_version = prologue.ir_version
        onnx.checker.check_model(joined)
        onnx.save(joined, path)


def _add_initializers(graph: Any, initializers: list[Any],
                      shared: dict[tuple[int, tuple[int, ...], str], str]) -> None:
    """Append ``graph``'s initializers to ``initializers``, except those whose contents one
    already there has: the graph's nodes then read that one. A flow shared by every layer
    (a shared convflow, iCaloFlow's Flow-3) is exported once per step; without this its
    weights would be stored once per layer (44 copies of ~40 MB for a calochallenge-2
    student, near protobuf's 2 GB limit)."""
    from onnx import numpy_helper

    renamed = {}
    for initializer in graph.initializer:
        values = numpy_helper.to_array(initializer)
        key = (initializer.data_type, tuple(initializer.dims),
               hashlib.sha256(values.tobytes()).hexdigest())
        if key in shared:
            renamed[initializer.name] = shared[key]
        else:
            shared[key] = initializer.name
            initializers.append(initializer)
    if renamed:
        _rename_inputs(graph, renamed)


def _rename_inputs(graph: Any, renamed: dict[str, str]) -> None:
    """Point every node input of ``graph`` (subgraphs included) named in ``renamed`` at its
    new name."""
    from onnx import AttributeProto

    for node in graph.node:
        node.input[:] = [renamed.get(value, value) for value in node.input]
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                _rename_inputs(attribute.g, renamed)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    _rename_inputs(subgraph, renamed)


def run_onnx(path: str, inputs: np.ndarray, threads: int = 1) -> np.ndarray:
    """Run an exported ONNX graph with onnxruntime on the CPU."""
    return onnx_session(path, threads).run(None, {"inputs": inputs})[0]


def onnx_session(path: str, threads: int = 1) -> Any:
    """An onnxruntime CPU session of ``path`` on ``threads`` threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CaloforgeError(f"{path}: not a loadable ONNX graph "
                             f"({str(exc).splitlines()[0]})") from None


def read_export_description(path: str) -> dict[str, Any]:
    """The ``.export.json`` of an exported file, checked against the file's digest."""
    description_path = export_description_path(path)
    try:
        with open(description_path, encoding="utf-8") as stream:
            description = json.load(stream)
        with open(path, "rb") as stream:
            digest = hashlib.sha256(stream.read()).hexdigest()
    except FileNotFoundError as exc:
        raise CaloforgeError(f"{exc.filename}: missing (an exported model is the file and "
                             "its .export.json)") from None
    except (OSError, ValueError) as exc:
        raise CaloforgeError(f"{description_path}: unreadable ({exc})") from None
    if not isinstance(description, dict) or description.get("sha256") != digest:
        raise CaloforgeError(f"{path}: not the file {description_path} describes")
    return description
