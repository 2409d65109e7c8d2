"""The ``caloforge`` command line: one entry point with subcommands.

Each subcommand is a ``(configure, run)`` pair registered in :data:`COMMANDS`; ``run`` gets
the parsed arguments and does its work through the library API. User errors
(:class:`~caloforge.errors.CaloforgeError`) become one line on stderr and exit status 1;
invalid options exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._version import __version__
from .data import FORMATS
from .errors import CaloforgeError, OptionError
from .geometry import available_geometries, get_geometry, resolve_geometry
from .registry import FAMILIES, get_family, student_of, trainable_families
from .runtime import (
    Terminated,
    get_logger,
    parse_quantity,
    request_termination,
    set_progress,
    set_threads,
    setup_logging,
    tune_allocator,
)

log = get_logger("cli")
SHARD_SIZE = 10_000  # caloforge.sampling.SHARD_SIZE (not imported: it imports torch)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common_options(threads: bool = True) -> _Parser:
    """Options of every command (a fresh parser per command: argparse shares the actions
    of a parent parser between its children). ``threads=False`` for a command that
    defines its own ``--threads``."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--seed", type=int, default=None,
                       help="random seed (reproducible per seed and shard)")
    if threads:
        group.add_argument("--threads", type=int, default=None,
                           help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (default: auto)")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return common


def add_geometry_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--geometry NAME | --xml FILE [--particle NAME]`` (mutually exclusive)."""
    choice = parser.add_mutually_exclusive_group(required=required)
    choice.add_argument("--geometry", metavar="NAME",
                        help=f"built-in geometry: {', '.join(available_geometries())}")
    choice.add_argument("--xml", metavar="FILE", help="CaloChallenge binning XML file")
    parser.add_argument("--particle", default=None,
                        help="which <Bin> of the XML file to use, if it has several")


def geometry_from_args(args: argparse.Namespace):  # -> Geometry | None
    if getattr(args, "geometry", None) is None and getattr(args, "xml", None) is None:
        return None
    return resolve_geometry(args.geometry, args.xml, getattr(args, "particle", None))


# --- geometries ---------------------------------------------------------------------------
def _configure_geometries(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the full descriptions as JSON")


def _run_geometries(args: argparse.Namespace) -> int:
    geometries = [get_geometry(name) for name in available_geometries()]
    if args.json:
        print(json.dumps([g.to_dict() for g in geometries], indent=2))
        return 0
    print(f"{'name':<26}{'voxels':>8}{'layers':>8}  binning      description")
    for g in geometries:
        kind = "cylindrical" if g.is_cylindrical else "cartesian"
        print(f"{g.name:<26}{g.n_voxels:>8}{g.n_layers:>8}  {kind:<12} {g.description}")
    return 0


# --- inspect ------------------------------------------------------------------------------
def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="shower file (CaloChallenge or CaloGAN HDF5)")
    add_geometry_options(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--batch-size", type=int, default=10_000,
                        help="showers read per batch while streaming (default 10000)")


def _run_inspect(args: argparse.Namespace) -> int:
    from .data import summarize_file
    from .runtime import progress

    summary = summarize_file(args.file, geometry_from_args(args), args.batch_size, progress)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    lo, hi = summary["incident_energy_mev"]
    print(f"file          {summary['file']}")
    print(f"format        {summary['format']}   geometry: {summary['geometry'] or 'unknown'}")
    print(f"showers       {summary['n_showers']}   voxels: {summary['n_voxels']}")
    print(f"E_inc         {lo:.6g} - {hi:.6g} MeV")
    print(f"E_dep/E_inc   {summary['mean_deposited_fraction']:.4f} (mean)")
    print(f"sparsity      {summary['sparsity']:.4f} (fraction of zero voxels)")
    for name, info in summary["conditions"].items():
        print(f"condition     {name} [{info['units']}]  min {info['min']}  max {info['max']}")
    if "layers" in summary:
        print(f"{'layer':>7}{'voxels':>8}{'mean E [MeV]':>15}{'sparsity':>10}")
        for layer in summary["layers"]:
            print(f"{layer['layer_id']:>7}{layer['n_voxels']:>8}"
                  f"{layer['mean_energy_mev']:>15.4g}{layer['sparsity']:>10.4f}")
    return 0


# --- convert ------------------------------------------------------------------------------
def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="input shower file")
    parser.add_argument("-o", "--output", required=True, help="output file (written atomically)")
    parser.add_argument("--to", dest="to_format", choices=FORMATS,
                        default="calochallenge", help="output format (default calochallenge)")
    add_geometry_options(parser)
    parser.add_argument("--batch-size", type=int, default=10_000)


def _run_convert(args: argparse.Namespace) -> int:
    from .data import ShowerFile, ShowerWriter
    from .runtime import progress

    with ShowerFile(args.file, geometry_from_args(args)) as reader:
        geometry = reader.geometry
        if geometry is None:
            raise OptionError("converting needs the geometry: give --geometry or --xml")
        with ShowerWriter(args.output, geometry, args.to_format) as writer:
            total = -(-len(reader) // args.batch_size)
            for batch in progress(reader.iter_batches(args.batch_size), total=total,
                                  desc="convert", unit="batch"):
                writer.write(batch)
    log.info("wrote %d showers to %s (%s format)", writer.n_written, args.output, args.to_format)
    return 0


# --- simulate -----------------------------------------------------------------------------
def _configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--geometry", required=True, metavar="NAME",
                        help=f"built-in geometry: {', '.join(available_geometries())}")
    parser.add_argument("-n", "--n-showers", type=int, required=True, help="number of showers")
    parser.add_argument("-o", "--output", required=True, help="output HDF5 file (atomic)")
    parser.add_argument("--particle", choices=["electron", "photon", "pion"],
                        help="default: the geometry's published dataset")
    parser.add_argument("--energy-range", nargs=2, metavar=("LO", "HI"),
                        help="incident energy range, MeV or with a unit (e.g. 1GeV 1TeV)")
    parser.add_argument("--spectrum", choices=["log-uniform", "uniform", "inverse"],
                        help="energy spectrum over the range (inverse: dN/dE ~ 1/E)")
    parser.add_argument("--energies", metavar="LIST",
                        help="discrete energies, comma-separated (e.g. 1GeV,10GeV,100GeV), "
                             "equal numbers of showers each")
    parser.add_argument("--format", dest="file_format", choices=FORMATS,
                        default="calochallenge", help="output format (calogan: calogan geometry)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: CPU cores, at most 2); the output "
                             "is identical for any number")
    parser.add_argument("--chunk-size", type=int, default=None, help="showers per chunk")
    parser.add_argument("--max-spots", type=int, default=None,
                        help="cap on energy spots per shower component (default per detector)")


def _run_simulate(args: argparse.Namespace) -> int:

    from .runtime import progress_bar
    from .simulator import SimulationPlan, parse_energy, simulate_to_file

    if args.energies and (args.energy_range or args.spectrum):
        raise OptionError("give either --energies or --energy-range/--spectrum, not both")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise OptionError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.file_format == "calogan" and args.geometry != "calogan":
        raise OptionError(f"the calogan format needs the calogan geometry, not {args.geometry!r}")
    get_geometry(args.geometry)
    plan = SimulationPlan.from_options(
        args.geometry, args.n_showers, particle=args.particle, spectrum=args.spectrum,
        energy_range_mev=[parse_energy(e) for e in args.energy_range] if args.energy_range
        else None,
        energies_mev=[parse_energy(e) for e in args.energies.split(",")] if args.energies
        else None,
        seed=args.seed, chunk_size=args.chunk_size, max_spots=args.max_spots)
    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 2)
    if workers < 1:
        raise OptionError(f"--workers must be >= 1, got {workers}")
    n = simulate_to_file(args.output, plan, workers=workers, file_format=args.file_format,
                         progress=progress_bar)
    log.info("wrote %d %s showers (%s, seed %d) to %s", n, plan.particle, plan.geometry,
             plan.seed, args.output)
    return 0


# --- plot ---------------------------------------------------------------------------------
def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="shower file")
    add_geometry_options(parser)
    parser.add_argument("-o", "--output", default=None,
                        help="PNG file (default: FILE with .png)")
    parser.add_argument("--examples", type=int, default=3, help="single showers to draw")
    parser.add_argument("--max-showers", type=int, default=20_000,
                        help="showers read for the averages (default 20000)")


def _run_plot(args: argparse.Namespace) -> int:

    from .data import ShowerFile
    from .plotting import plot_showers

    if args.examples < 0 or args.max_showers < 1:
        raise OptionError("--examples must be >= 0 and --max-showers >= 1")
    geometry = geometry_from_args(args)
    with ShowerFile(args.file, geometry) as reader:
        geometry = reader.geometry
        if geometry is None:
            raise OptionError("plotting needs the geometry: give --geometry or --xml")
        data = reader.read(0, args.max_showers)
    if len(data) == 0:
        raise OptionError(f"{args.file}: no showers to plot")
    output = args.output or os.path.splitext(args.file)[0] + ".png"
    plot_showers(data.showers, data.incident_energies, geometry, output, args.examples,
                 title=f"{os.path.basename(args.file)} ({geometry.name}, {len(data)} showers)")
    log.info("wrote %s", output)
    return 0


# --- evaluate -----------------------------------------------------------------------------
def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="reference shower file")
    parser.add_argument("--generated", required=True, help="generated shower file")
    add_geometry_options(parser, required=True)
    parser.add_argument("-o", "--output", required=True, help="report directory")
    from .evaluation.classifier import PRESETS
    from .evaluation.report import DEFAULT_METRICS, METRICS

    parser.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                        help=f"comma-separated subset of {','.join(METRICS)} "
                             f"(default {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--classifier-preset", choices=list(PRESETS), default=None,
                        help="official: exactly the CaloChallenge evaluate.py classifier "
                             "(3 x 2048, float64, 50 epochs, fixed split sizes; hours on a "
                             "CPU, default on CUDA); fast: CPU-sized (default on CPU)")
    parser.add_argument("--classifier-width", type=int, default=None,
                        help="override the preset's hidden width (every other rule kept, "
                             "recorded in metrics.json), e.g. 256")
    parser.add_argument("--classifier-epochs", type=int, default=None,
                        help="override the preset's number of epochs, e.g. 15")
    parser.add_argument("--repeats", type=int, default=3, help="classifier seeds (default 3)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="voxel threshold in MeV (default: the geometry's)")
    parser.add_argument("--max-showers", type=int, default=None,
                        help="use at most this many showers of each file")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="separation powers without the histogram PNGs (their drawing "
                             "takes minutes on calochallenge-3)")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import EvaluationSettings, evaluate_samples, format_summary
    from .evaluation.report import check_report_folder, load_for_evaluation
    from .runtime import progress, resolve_device

    geometry = geometry_from_args(args)
    device = resolve_device(args.device)
    preset = args.classifier_preset or ("official" if device.startswith("cuda") else "fast")
    settings = EvaluationSettings(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        classifier_preset=preset, classifier_width=args.classifier_width,
        classifier_epochs=args.classifier_epochs, repeats=args.repeats,
        threshold_mev=args.threshold,
        max_showers=args.max_showers, seed=args.seed or 0, device=device, plots=args.plots,
        extra={"reference_file": args.reference, "generated_file": args.generated})
    settings.validate()
    if args.max_showers is not None and args.max_showers < 1:
        raise OptionError("--max-showers must be >= 1")
    check_report_folder(args.output)
    reference = load_for_evaluation(args.reference, geometry, args.max_showers)
    generated = load_for_evaluation(args.generated, geometry, args.max_showers)
    result = evaluate_samples(reference, generated, geometry, args.output, settings,
                              progress=progress, log=log.info, own_showers=True)
    print(format_summary(result))
    print(f"report: {args.output}/report.html")
    return 0


# --- train --------------------------------------------------------------------------------
def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", choices=trainable_families(),
                        help="model family: " + "; ".join(
                            f"{name} ({FAMILIES[name].summary})" for name in trainable_families()))
    parser.add_argument("--data", required=True, help="training shower file")
    add_geometry_options(parser, required=True)
    parser.add_argument("-o", "--output", required=True, help="run directory")
    add_training_options(parser, "; ".join(
        f"{name}: {', '.join(FAMILIES[name].presets)}" for name in trainable_families())
        + " (cpu: the default; paper: the published sizes, for a GPU)",
        "YAML file overriding the preset")
    parser.add_argument("--layers", default=None,
                        help="convflow: train only these parts, e.g. 0-9 or energy,0-14 "
                             "(join runs with `caloforge merge`); default all")
    parser.add_argument("--postprocess", choices=["none", "spline", "layer-spline",
                                                  "group-spline"], default=None,
                        help="convflow, icaloflow: fit a monotone spline from generated to "
                             "reference cell energies after training (convflow: layer-spline "
                             "one per layer, group-spline one per hit calibration group; "
                             "default: the config's, none)")


def add_training_options(parser: argparse.ArgumentParser, presets: str, config_help: str
                         ) -> None:
    """--preset, --config, --epochs | --time-budget, --resume, --max-showers."""
    parser.add_argument("--preset", default="cpu", help=f"named configuration: {presets}")
    parser.add_argument("--config", default=None, help=config_help)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="number of epochs")
    budget.add_argument("--time-budget", default=None,
                        help="stop before this much training time, e.g. 30m, 1.5h")
    parser.add_argument("--resume", action="store_true", help="continue a killed run")
    parser.add_argument("--max-showers", type=int, default=None,
                        help="use only the first N showers of the file")
    parser.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                        help="read the training file block by block instead of whole (files "
                             "larger than memory; families that support it: icaloflow, "
                             "convflow). auto: when the voxels exceed --memory-limit")
    parser.add_argument("--memory-limit", default="4GB",
                        help="voxel data above this size are streamed with --stream auto "
                             "(default 4GB)")


def _training_data(args: argparse.Namespace, geometry, streams: bool):
    """The training showers: in memory, or a ShowerStream when asked or too large."""
    from .data import ShowerFile, ShowerStream, read_showers

    if args.max_showers is not None and args.max_showers < 1:
        raise OptionError(f"--max-showers must be >= 1, got {args.max_showers}")
    memory_limit = parse_size(args.memory_limit)
    stream = args.stream == "on"
    if args.stream == "auto" and streams:
        with ShowerFile(args.data, geometry) as reader:
            n = len(reader) if args.max_showers is None else min(len(reader), args.max_showers)
            stream = 4 * n * reader.n_voxels > memory_limit
    if stream:
        if not streams:
            raise OptionError("this model family trains in memory; use --stream off")
        return ShowerStream(args.data, geometry, args.max_showers)
    return read_showers(args.data, geometry, max_showers=args.max_showers)


def parse_size(text: str) -> float:
    """Bytes from ``500MB``, ``4GB``, ``4GiB`` (taken as 4 GB), ``1e9``."""
    units = {f"{prefix}{suffix}": factor for prefix, factor in
             (("k", 1e3), ("m", 1e6), ("g", 1e9), ("t", 1e12))
             for suffix in ("", "b", "ib")}
    return parse_quantity(text, {**units, "b": 1.0}, "size", "500MB, 4GB")


def _run_train(args: argparse.Namespace) -> int:
    from .models import load_model

    geometry = geometry_from_args(args)
    family = get_family(args.family)
    model: Any  # a ConditionedModel of the family
    if args.resume:
        _refuse_config_on_resume(args)
        model = load_model(args.output)
    else:
        given = {k: v for k, v in {"layers": args.layers,
                                   "postprocess": args.postprocess}.items() if v is not None}
        foreign = [k for k in given if k not in family.train_options]
        if foreign:
            owners = [n for n, f in FAMILIES.items() if foreign[0] in f.train_options]
            raise OptionError(f"--{foreign[0]} is an option of {' / '.join(owners)} only")
        model_class = family.model_class()
        model = model_class(geometry, build_config(model_class, args.preset, args.config,
                                                   given))
    summary = _fit_from_args(model, args, geometry)
    label = model.validation_label or "validation loss"
    _main_prints(f"trained {args.family}: {summary['epochs']} epochs in "
                 f"{summary['train_seconds']} s, best {label} {summary['best_val_loss']:.4f} "
                 f"at epoch {summary['best_epoch']}; model in {args.output}")
    return 0


def build_config(model_class: Any, preset: str, config_file: str | None,
                 overrides: dict | None = None) -> Any:
    """The one config builder of train and distill: the family's preset, then the YAML
    file's options, then command-line overrides (each merged section by section)."""
    config = model_class.preset(preset)
    for values in (_read_yaml(config_file) if config_file else None, overrides):
        if values:
            config = type(config).from_dict(merge_options(config.to_dict(), values))
    return config


def _refuse_config_on_resume(args: argparse.Namespace) -> None:
    if args.config:
        raise OptionError("--resume continues with the run's saved configuration; "
                          "drop --config")


def _fit_from_args(model: Any, args: argparse.Namespace, geometry: Any) -> dict:
    """What train and distill share after building the model: the budget and seed options,
    the training data (in memory or streamed), ``fit`` with the data file recorded."""

    from .runtime import progress_bar, resolve_device

    device = _join_processes(resolve_device(args.device))
    _apply_budget(model.config.training, args)
    data = _training_data(args, geometry, model.streams_training_data)
    return model.fit(data, args.output, resume=args.resume, device=device,
                     progress=progress_bar, metadata={"data": {
                         "file": os.path.abspath(args.data), "n_showers": len(data)}})


def _join_processes(device: str) -> str:
    """Under ``torchrun``: join the job (see :mod:`caloforge.distributed`) and return this
    process's device; ranks other than 0 then log warnings only and draw no progress
    bars. Alone: ``device`` unchanged."""
    from .distributed import init_from_environment

    world, device = init_from_environment(device)
    if not world.is_main:
        setup_logging(-1)
        set_progress(False)
    return device


def _main_prints(message: str) -> None:
    """Print on rank 0 only (every process of a torchrun job runs the command)."""
    from .distributed import current_world

    if current_world().is_main:
        print(message)


def merge_options(base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base``, section by section (a config file's
    ``training: {learning_rate: ...}`` keeps the preset's other training options)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_options(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            values = yaml.safe_load(stream) or {}
    except FileNotFoundError:
        raise OptionError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise OptionError(f"{path}: a config file must be a mapping of options")
    return values


# --- distill -------------------------------------------------------------------------------
def _configure_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of a trained caloflow or icaloflow "
                                        "teacher")
    parser.add_argument("-o", "--output", required=True, help="student run directory")
    parser.add_argument("--data", default=None,
                        help="training shower file (default: the one the teacher was trained on)")
    add_training_options(parser, "cpu (default), tiny",
                         "YAML file overriding the preset (student:, beta:, guided:, training:)")


def _run_distill(args: argparse.Namespace) -> int:
    from .models import load_model

    teacher = load_model(args.run_dir)
    student_family = student_of(teacher.family)
    if student_family is None:
        teachers = [f.teacher for f in FAMILIES.values() if f.teacher]
        raise CaloforgeError(f"{args.run_dir}: a {teacher.family!r} model has no student; "
                             f"distil one of: {', '.join(teachers)}")
    student_class = student_family.model_class()
    student: Any
    if args.resume:
        _refuse_config_on_resume(args)
        student = load_model(args.output)
        if not isinstance(student, student_class):
            raise CaloforgeError(f"{args.output}: not a distillation run of this teacher's "
                                 "family")
        student.attach_teacher(teacher, args.run_dir)
    else:
        student = student_class.from_teacher(
            teacher, build_config(student_class, args.preset, args.config),
            teacher_dir=args.run_dir)
    if args.data is None:
        args.data = teacher.training_summary.get("data", {}).get("file")
    if not args.data:
        raise OptionError(f"{args.run_dir}: the teacher does not record its training file; "
                          "pass --data")
    summary = _fit_from_args(student, args, teacher.geometry)
    _main_prints(f"distilled {args.run_dir}: {summary['epochs']} epochs in "
                 f"{summary['train_seconds']} s, best KL(student||teacher) "
                 f"{summary['best_val_loss']:.4f} nats at epoch {summary['best_epoch']}; "
                 f"student in {args.output}")
    return 0


def _apply_budget(training, args: argparse.Namespace) -> None:  # training: TrainingConfig
    """--epochs / --time-budget / --seed on top of the configured training settings."""
    from .training import parse_duration

    if args.epochs is not None:
        training.epochs, training.time_budget_s = args.epochs, None
    if args.time_budget is not None:
        training.time_budget_s = parse_duration(args.time_budget)
        training.epochs = max(training.epochs, 1000)
    if args.seed is not None and not args.resume:
        training.seed = args.seed
    training.validate()


# --- merge ---------------------------------------------------------------------------------
def _configure_merge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="convflow run directories trained with "
                                                "disjoint --layers on the same data and config")
    parser.add_argument("-o", "--output", required=True, help="directory of the merged model")


def _run_merge(args: argparse.Namespace) -> int:

    from .models import load_model
    from .models.flows.convflow import ConvL2LFlow, merge_runs

    if os.path.exists(os.path.join(args.output, "model.json")):
        raise OptionError(f"{args.output}: already holds a model; choose a new directory")
    models = []
    for run in args.runs:
        model = load_model(run)
        if not isinstance(model, ConvL2LFlow):
            raise OptionError(f"{run}: a {model.family} model; only convflow runs merge")
        models.append(model)
    merged = merge_runs(models)
    merged.save(args.output)
    print(f"merged {len(models)} runs ({', '.join(merged.trained_parts)}) into {args.output}")
    return 0


# --- generate ------------------------------------------------------------------------------
def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of a trained model")
    parser.add_argument("-n", "--n-showers", type=int, default=None, help="number of showers")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--like", metavar="REF.h5",
                        help="take incident energies (and conditions) from this file")
    source.add_argument("--energies", metavar="FILE",
                        help="incident energies: a shower file or a text file (MeV per line)")
    parser.add_argument("-o", "--output", required=True, help="output shower file (atomic)")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="generate for conditions outside the training range")
    parser.add_argument("--shard", metavar="K/N", default=None,
                        help="write only part K (from 0) of N of this generation; the parts "
                             "joined in order by merge-showers are the showers of the whole "
                             "(under torchrun each process takes a part by itself)")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                        help=f"showers per random stream (default {SHARD_SIZE:,}); the "
                             "showers depend on the seed and this size, not on --batch-size "
                             "or the number of parts")


def _run_generate(args: argparse.Namespace) -> int:
    from .distributed import barrier, current_world, launched_by_torchrun
    from .models import load_model
    from .runtime import progress_bar, resolve_device
    from .sampling import generate_to_file, generation_inputs, parse_part, part_range

    if args.shard is not None and launched_by_torchrun():
        raise OptionError("under torchrun each process takes its part: drop --shard")
    part = parse_part(args.shard) if args.shard is not None else (0, 1)
    device = _join_processes(resolve_device(args.device))
    world = current_world()
    if world.distributed:
        part = (world.rank, world.size)
    if args.n_showers is not None and args.n_showers < 1:
        raise OptionError(f"-n must be >= 1, got {args.n_showers}")
    model = load_model(args.run_dir)
    seed = args.seed if args.seed is not None else 0
    energies, conditions, source = generation_inputs(model, args.n_showers, args.like,
                                                     args.energies, seed)
    part_range(len(energies), *part, args.shard_size)  # refuse impossible parts up front
    if not args.allow_extrapolation:
        model.check_conditions(energies, conditions, source)
    output = _part_file(args.output, world.rank, world.size) if world.distributed \
        else args.output
    n = generate_to_file(model, output, energies, conditions, seed, args.batch_size,
                         device, progress_bar, part=part, shard_size=args.shard_size)
    log.info("wrote %d showers from %s to %s", n, args.run_dir, output)
    if world.distributed:  # rank 0 joins the parts once all are written
        barrier()
        if world.is_main:
            from .data import merge_shower_files

            parts = [_part_file(args.output, rank, world.size) for rank in range(world.size)]
            total = merge_shower_files(parts, args.output, model.geometry,
                                       progress=progress_bar)
            for path in parts:
                os.remove(path)
            log.info("merged %d parts (%d showers) into %s", world.size, total, args.output)
        barrier()
    return 0


def _part_file(output: str, rank: int, size: int) -> str:
    """Where process ``rank`` of a torchrun generation writes its part (beside the output,
    removed once merged)."""
    folder, name = os.path.split(output)
    return os.path.join(folder, f".{name}.part-{rank}-of-{size}")


# --- merge-showers -------------------------------------------------------------------------
def _configure_merge_showers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="shower files, joined in this order")
    parser.add_argument("-o", "--output", required=True, help="merged shower file (atomic)")
    add_geometry_options(parser)


def _run_merge_showers(args: argparse.Namespace) -> int:
    from .data import merge_shower_files
    from .runtime import progress_bar

    total = merge_shower_files(args.files, args.output, geometry_from_args(args),
                               progress=progress_bar)
    print(f"merged {len(args.files)} files ({total} showers) into {args.output}")
    return 0


# --- bench-sampling ------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _configure_bench_sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of a trained model, or a graph written "
                                        "by caloforge export (.onnx: timed with onnxruntime "
                                        "on the CPU)")
    parser.add_argument("--threads", dest="bench_threads", type=_int_list, default=[1, 2],
                        help="comma-separated CPU thread counts (default 1,2)")
    parser.set_defaults(threads=None)  # in place of the common --threads
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 100, 10_000],
                        help="comma-separated batch sizes (default 1,100,10000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per setting (median reported; default 3)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop repeating a setting after this long (at least one repeat)")
    parser.add_argument("--like", metavar="REF.h5", default=None,
                        help="take incident energies and conditions from this file "
                             "(default: the training energy distribution)")
    parser.add_argument("-o", "--output", default=None,
                        help="JSON file for the results (default RUN_DIR/sampling_benchmark.json)")


def _run_bench_sampling(args: argparse.Namespace) -> int:
    import platform

    import numpy as np

    from .atomic import write_json_atomic
    from .evaluation.timing import benchmark_sampling, format_sampling_table
    from .models import load_model
    from .runtime import progress_bar, resolve_device
    from .sampling import generation_inputs

    if args.repeats < 1:
        raise OptionError(f"--repeats must be >= 1, got {args.repeats}")
    if os.path.isfile(args.run_dir):
        return _bench_exported(args)
    device = resolve_device(args.device)
    model = load_model(args.run_dir)
    largest = max(args.batch_sizes)
    seed = args.seed if args.seed is not None else 0
    energies, conditions, _ = generation_inputs(model, None if args.like else largest, args.like,
                                                None, seed)
    # repeat the inputs up to the largest batch (conditions may be (N, k): index rows)
    rows_needed = np.resize(np.arange(len(energies)), largest)
    energies = energies[rows_needed]
    conditions = {k: np.asarray(v)[rows_needed] for k, v in conditions.items()}

    def sample(n: int) -> None:
        model.sample(energies[:n], {k: v[:n] for k, v in conditions.items()}, seed=seed,
                     batch_size=n, device=device)

    rows = benchmark_sampling(sample, args.bench_threads, args.batch_sizes, args.repeats,
                              device, args.max_seconds, progress_bar)
    print(f"{model.family} from {args.run_dir} ({model.geometry.name}, "
          f"{model.geometry.n_voxels} voxels, device {device}):")
    print(format_sampling_table(rows))
    output = args.output or os.path.join(args.run_dir, "sampling_benchmark.json")
    write_json_atomic(output, {"run_dir": os.path.abspath(args.run_dir), "family": model.family,
                               "geometry": model.geometry.name, "device": device,
                               "cpu": platform.processor() or platform.machine(),
                               "results": rows})
    log.info("wrote %s", output)
    return 0


def _bench_exported(args: argparse.Namespace) -> int:
    """bench-sampling of an exported ONNX graph with onnxruntime (CPU). Inputs: standard-
    normal noise (and condition columns: the cost does not depend on their values), incident
    energies log-uniform in the training range its description records."""

    import numpy as np

    from .atomic import write_json_atomic
    from .evaluation.timing import benchmark_sampling, format_sampling_table
    from .export import onnx_session, read_export_description
    from .runtime import progress_bar

    description = read_export_description(args.run_dir)
    if description["format"] != "onnx":
        raise OptionError(f"{args.run_dir}: bench-sampling times ONNX graphs (onnxruntime); "
                          "time a TorchScript export's run directory instead")
    if args.like:
        raise OptionError("--like applies to run directories; an exported graph is timed "
                          "on inputs of its training range")
    width = description["layout"]["input"]["shape"][1]
    low, high = description["training_range"]["incident_energy_mev"]
    rng = np.random.default_rng(args.seed or 0)
    largest = max(args.batch_sizes)
    inputs = rng.standard_normal((largest, width)).astype(np.float32)
    layout = description["layout"]
    energy = np.exp(rng.uniform(np.log(low), np.log(high), largest)) / (
        1000.0 if layout["units"] == "GeV" else 1.0)
    inputs[:, layout["n_noise"]] = energy / (layout["input_energy_max"] or 1.0)
    rows = []
    for threads in args.bench_threads:
        session = onnx_session(args.run_dir, threads)

        def sample(n: int, session: Any = session) -> None:
            session.run(None, {"inputs": inputs[:n]})

        rows += benchmark_sampling(sample, [threads], args.batch_sizes, args.repeats, "cpu",
                                   args.max_seconds, progress_bar)
    print(f"{layout['family']} exported to {args.run_dir} ({layout['geometry']}, "
          f"{layout['n_voxels']} voxels, onnxruntime, CPU):")
    print(format_sampling_table(rows))
    output = args.output or args.run_dir + ".sampling_benchmark.json"
    write_json_atomic(output, {"exported": os.path.abspath(args.run_dir),
                               "runtime": "onnxruntime", "family": layout["family"],
                               "geometry": layout["geometry"], "device": "cpu",
                               "results": rows})
    log.info("wrote %s", output)
    return 0


# --- export --------------------------------------------------------------------------------
def _configure_export(parser: argparse.ArgumentParser) -> None:
    from .export import ENERGY_UNITS, EXPORT_FORMATS

    parser.add_argument("run_dir", help="run directory of a trained model that samples in one "
                                        "pass (caloflow-student, icaloflow-student, calogan, "
                                        "wgan)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                        help="onnx (Par04, DDML with ONNX Runtime; default) or torchscript "
                             "(DDML with LibTorch)")
    parser.add_argument("-o", "--output", required=True,
                        help="the graph file (e.g. model.onnx / model.pt); its description "
                             "goes to OUTPUT.export.json")
    parser.add_argument("--units", choices=list(ENERGY_UNITS), default="MeV",
                        help="energy unit of the input incident energy and of the output "
                             "voxels (DDML: GeV; default MeV)")
    parser.add_argument("--normalise-by-einc", action="store_true",
                        help="output voxel energy / incident energy (Par04's convention)")
    parser.add_argument("--input-energy-max", type=float, default=None, metavar="E",
                        help="the input energy column is E_inc / E (in --units), as Par04 "
                             "feeds it")


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_description_path, export_model
    from .models import load_model

    model = load_model(args.run_dir)
    description = export_model(model, args.output, args.format, args.units,
                               args.input_energy_max, args.normalise_by_einc, args.run_dir)
    layout = description["layout"]
    print(f"exported {model.family} ({layout['geometry']}) to {args.output} "
          f"({args.format}): input {layout['input']['shape']}, output "
          f"{layout['output']['shape']}; onnxruntime/TorchScript agree with torch to "
          f"{description['check']['max_relative_deviation']:.2g} (relative; "
          f"{description['check']['cut_flips']} voxels rounded across the cut) on "
          f"{description['check']['showers']} showers; layout in "
          f"{export_description_path(args.output)}")
    return 0


Command = tuple[str, Callable[[argparse.ArgumentParser], None],
                Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("geometries: list the built-in geometries and their voxel counts",
     _configure_geometries, _run_geometries),
    ("inspect: validate a shower file and print a summary", _configure_inspect, _run_inspect),
    ("convert: convert between CaloChallenge and CaloGAN HDF5 formats",
     _configure_convert, _run_convert),
    ("simulate: simulate reference showers (GFLASH parameterisation) into a file",
     _configure_simulate, _run_simulate),
    ("plot: draw single and average showers and profiles of a file as PNG",
     _configure_plot, _run_plot),
    ("train: train a model on a shower file (checkpoints, resume, loss curve)",
     _configure_train, _run_train),
    ("distill: distil a CaloFlow or iCaloFlow teacher into one-pass IAF students",
     _configure_distill, _run_distill),
    ("merge: join convflow runs trained on disjoint --layers into one model",
     _configure_merge, _run_merge),
    ("generate: sample showers from a trained model into a file", _configure_generate,
     _run_generate),
    ("merge-showers: join shower files of one geometry into one file (streamed, atomic)",
     _configure_merge_showers, _run_merge_showers),
    ("export: write a one-pass model as an ONNX or TorchScript graph for Geant4/DD4hep",
     _configure_export, _run_export),
    ("bench-sampling: time sampling (ms/shower, showers/s, peak memory) per threads and batch",
     _configure_bench_sampling, _run_bench_sampling),
    ("evaluate: compare generated with reference showers (histograms, classifier, FPD/KPD)",
     _configure_evaluate, _run_evaluate),
]

# bench-sampling takes a list of thread counts to compare
COMMANDS_WITH_OWN_THREADS = {"bench-sampling"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="caloforge",
                     description="Fast calorimeter shower simulation with generative models.")
    parser.add_argument("--version", action="version", version=f"caloforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for help_line, configure, run in COMMANDS:
        name, _, text = help_line.partition(": ")
        common = _common_options(threads=name not in COMMANDS_WITH_OWN_THREADS)
        child = sub.add_parser(name, help=text, description=text, parents=[common])
        configure(child)
        child.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    setup_logging(-1 if args.quiet else args.verbose)
    set_progress(not args.no_progress)
    previous_handler = _terminate_as_exception()
    try:
        set_threads(args.threads)
        tune_allocator()
        return int(args.run(args) or 0)
    except CaloforgeError as exc:
        print(f"caloforge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"caloforge {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"caloforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"caloforge {args.command}: error: out of memory; use a smaller --batch-size",
              file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. an unwritable output directory or a full disk
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"caloforge {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if "torch.distributed" in sys.modules:
            from .distributed import shutdown

            shutdown()


def _terminate_as_exception() -> Any:
    """Make SIGTERM raise :class:`Terminated`; returns the previous handler (None where
    signals cannot be set: not the main thread)."""
    def handler(signum: int, frame: Any) -> None:
        request_termination()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
