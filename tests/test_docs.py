"""The documentation: the README's size, links and Python quickstart; the docstring examples;
the strict mkdocs build."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from caloforge.models.base import weights_path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "src" / "caloforge"


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http:", "https:"))]
    assert local and all((ROOT / link).exists() for link in local), local


def test_readme_python_quickstart_runs(tmp_path, monkeypatch):
    block = re.search(r"## Quickstart: Python\s+```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert 0.0 <= namespace["result"]["cls-low"]["auc_mean"] <= 1.0
    assert Path(weights_path(str(tmp_path / "runs" / "cf"))).exists()


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples(name):
    """``>>>`` examples run (doctest); ``Example::`` blocks are valid Python."""
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
    source = Path(module.__file__).read_text(encoding="utf-8")
    for block in example_blocks(source):
        compile(block, f"{name} example", "exec")


def example_blocks(source: str) -> list[str]:
    """The code of each ``Example::`` block: the lines indented deeper than its first."""
    blocks = []
    for match in re.finditer(r"Example::\n\n", source):
        lines = source[match.end():].splitlines()
        indent = len(lines[0]) - len(lines[0].lstrip())
        code = []
        for line in lines:
            if line.strip() and len(line) - len(line.lstrip()) < indent:
                break
            code.append(line)
        blocks.append(textwrap.dedent("\n".join(code)))
    assert all(blocks), "an empty Example:: block"
    return blocks


def test_mkdocs_build_is_clean(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


def test_convflow_recipes_in_the_docs_are_valid_configs():
    """Every ```yaml block of docs/convflow.md is a convflow configuration the package
    accepts (the recipes users copy must not rot as options change)."""
    import yaml

    from caloforge.models.flows.convflow import ConvFlowConfig

    text = (ROOT / "docs" / "convflow.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        ConvFlowConfig.from_dict(yaml.safe_load(block))
