"""The package passes ``ruff check`` with the configuration in pyproject.toml ([tool.ruff]).

ruff is part of the ``dev`` extra, so it is required here, not skipped: a finding fails the test
with ruff's own report (file, line, rule). Run ``ruff check branchify`` locally to see the same.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from ruff.__main__ import find_ruff_bin

REPO = Path(__file__).resolve().parents[2]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_ruff_bin(), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_package_passes_ruff():
    result = _ruff("check", "branchify", "--output-format", "concise", "--no-cache")
    assert result.returncode == 0, f"ruff check branchify found problems:\n{result.stdout}{result.stderr}"


def test_ruff_reads_the_project_configuration(tmp_path):
    # The check above is only as strict as the configuration it reads: an unsorted import block, a
    # line over 120 characters and an unused import must each be reported from the repository root.
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nx = '" + "a" * 130 + "'\n")
    result = _ruff("check", str(bad), "--output-format", "concise", "--no-cache", "--config",
                   str(REPO / "pyproject.toml"))
    assert result.returncode == 1
    missing = [code for code in ("I001", "E501", "F401") if code not in result.stdout]
    assert not missing, f"ruff did not report {missing}:\n{result.stdout}"
    assert (REPO / "branchify" / "py.typed").is_file(), "the PEP 561 marker is missing"


def absolute_self_imports(package: Path) -> list[str]:
    """``file:line`` of every import of the package by its own name inside it: modules import each other
    relatively (``from ..spec import Spec``); only the apps under ``recipes/`` may bind the public API
    as a user script does (``import branchify as bf``)."""
    import ast

    name, found = package.name, []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == name:
                found.append(f"{rel}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    as_user = alias.name == name and alias.asname == "bf" and rel.startswith(f"{name}/recipes/")
                    if alias.name.split(".")[0] == name and not as_user:
                        found.append(f"{rel}:{node.lineno} import {alias.name}")
    return found


def test_the_package_imports_itself_relatively():
    found = absolute_self_imports(REPO / "branchify")
    assert not found, "import these relatively (from .x import y / from .. import z):\n" + "\n".join(found)


def test_the_import_style_check_finds_absolute_self_imports(tmp_path):
    pkg = tmp_path / "branchify"
    (pkg / "recipes").mkdir(parents=True)
    (pkg / "a.py").write_text("from .b import c\nfrom branchify.b import c\nimport branchify.b as b\n")
    (pkg / "recipes" / "app.py").write_text("import branchify as bf\nfrom ..a import c\n")
    (pkg / "core.py").write_text("def f():\n    import branchify as bf\n")
    assert absolute_self_imports(pkg) == ["branchify/a.py:2 from branchify.b import ...", "branchify/a.py:3 import branchify.b",
                                          "branchify/core.py:2 import branchify"]
