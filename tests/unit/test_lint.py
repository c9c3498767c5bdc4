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
