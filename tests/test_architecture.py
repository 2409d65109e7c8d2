"""The layering of the package, read from the source: lower modules never import higher
ones, and no model family imports another (shared machinery has its own module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from caloforge.registry import FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "caloforge"

# foundations: import nothing from models, training, evaluation or cli (the registry names
# the families' modules as strings and imports none of them)
FOUNDATIONS = ("errors", "runtime", "distributed", "atomic", "geometry", "detectors",
               "response", "data", "preprocessing", "hit_counts", "core_fraction",
               "layer_hits", "features", "plotting", "simulator", "registry", "_version")
HIGHER = ("models", "training", "evaluation", "cli", "sampling", "export")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every caloforge module ``path`` imports (at any depth of the file, lazy imports
    included), as dotted names relative to the package."""
    own = module_name(path).split(".") if module_name(path) else []
    package = own if path.name == "__init__.py" else own[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name])
                                                      for a in node.names]
                found.update(n for n in names if n)
                found.update(f"{target}.{a.name}".strip(".") for a in node.names)
            elif node.module and node.module.startswith("caloforge"):
                found.add(node.module.removeprefix("caloforge").strip("."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("caloforge").strip(".") for a in node.names
                         if a.name.startswith("caloforge"))
    return {name for name in found if name}


MODULES = {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}


def imports_from(module: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in MODULES[module]
                  if any(name == p or name.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[0] in FOUNDATIONS])
def test_foundations_import_nothing_higher(module):
    assert imports_from(module, HIGHER) == []


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("models")])
def test_models_import_neither_evaluation_nor_cli(module):
    assert imports_from(module, ("evaluation", "cli", "sampling")) == []


def test_evaluation_imports_no_model():
    for module in (m for m in MODULES if m.startswith("evaluation")):
        assert imports_from(module, ("models", "training", "cli")) == [], module


def test_no_family_imports_another():
    family_modules = {f.module.removeprefix("caloforge.") for f in FAMILIES.values()}
    assert len(family_modules) >= 5
    for module in family_modules:
        others = tuple(sorted(family_modules - {module}))
        assert imports_from(module, others) == [], module


def test_the_package_does_not_import_itself_back():
    """``caloforge/__init__`` imports its modules; they take ``__version__`` from
    ``_version`` rather than from the package (an import cycle)."""
    for module, names in MODULES.items():
        if module:
            assert "__version__" not in {n.rsplit(".", 1)[-1] for n in names
                                         if n.count(".") == 0}, module


def test_geometry_is_below_the_simulator():
    assert imports_from("geometry", ("detectors", "response", "simulator")) == []


def test_every_geometry_has_exactly_one_detector():
    """One list of geometry names (geometry.py); the detectors take name and readout
    threshold from it rather than repeating them."""
    from caloforge.detectors import _DETECTORS, get_detector
    from caloforge.geometry import available_geometries, get_geometry

    assert sorted(_DETECTORS) == sorted(available_geometries())
    for name in available_geometries():
        detector = get_detector(name)
        assert detector.geometry_name == name
        assert detector.threshold_mev > 0
    for name in ("calochallenge-2", "calochallenge-3", "ild-ecal"):  # readout = evaluation cut
        assert get_detector(name).threshold_mev == get_geometry(name).threshold_mev


BENCH = PACKAGE.parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_bench_scripts_run_the_cli_through_the_pipeline(script):
    """simulate → train → generate → evaluate lives once, in bench/pipeline.py (the memory
    benchmark runs Python children of its own, not CLI steps)."""
    source = (BENCH / script).read_text(encoding="utf-8")
    assert '"caloforge")' not in source, script
    if script != "bench_flow_memory.py":
        assert "subprocess" not in source, script
