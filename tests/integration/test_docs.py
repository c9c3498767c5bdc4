"""The documentation site builds in strict mode, and its API reference covers the public surface.

``mkdocs build --strict`` fails on any warning: a broken link, a page missing from the nav, a
docstring section griffe cannot parse, or an API name that no longer exists. The build is run
once per test session (about 15 s) into a temporary folder.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import branchify as bf
from branchify.methods import get_preset

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is part of the dev extra")
pytest.importorskip("mkdocstrings")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    warnings = [line for line in run.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert run.returncode == 0 and not warnings, "mkdocs build --strict failed:\n" + "\n".join(
        warnings or run.stderr.splitlines()[-30:])
    return out


def test_the_site_builds_in_strict_mode_with_every_page(site):
    assert (site / "index.html").is_file()
    for page in ("getting-started", "concepts", "any-model", "reliability", "benchmarks", "architecture"):
        assert (site / page / "index.html").is_file(), page


def _api_anchors(site: Path) -> set[str]:
    html = "".join(p.read_text() for p in (site / "api").rglob("index.html"))
    return set(re.findall(r'id="(branchify\.[A-Za-z_][\w.]*)"', html))


def test_every_public_name_is_in_the_api_reference(site):
    anchors = _api_anchors(site)
    missing = [name for name in bf.__all__ if f"branchify.{name}" not in anchors]
    assert not missing, f"branchify.__all__ names without an API entry: {missing}"


def test_every_preset_has_a_method_page_and_an_api_entry(site):
    anchors = _api_anchors(site)
    for name in bf.available_methods():
        page = site / "methods" / name / "index.html"
        assert page.is_file(), f"no docs/methods/{name}.md"
        text = page.read_text()
        assert "arithmatex" in text, f"docs/methods/{name}.md has no formula"
        module = get_preset(name).build.__module__  # the module that defines and documents the preset
        assert module in anchors, f"preset {name!r} ({module}) is not in the API reference"
