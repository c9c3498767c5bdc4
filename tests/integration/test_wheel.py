"""The built wheel installs only ``branchify`` (with its configs), and its CLI runs outside the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the installed setuptools (no network needed)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (path,) = out.glob("branchify-*.whl")
    return path


def test_the_wheel_holds_only_branchify_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t == "branchify" or t.startswith("branchify-") for t in top), sorted(top)
    assert "branchify/recipes/configs/cifar100_resnet32_one.yaml" in names
    assert "branchify/py.typed" in names  # PEP 561: type checkers read the package's hints
    assert not [n for n in names if "benchmark" in n.rpartition("/")[2]], "benchmark drivers belong in benchmarks/"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "branchify-train = branchify.recipes.cli:main" in text and "[branchify.plugins]" in text


def test_the_installed_cli_trains_one_epoch_from_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import branchify; print(branchify.__file__)"], cwd=tmp_path,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(target)), where  # the installed copy, not the checkout
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "branchify.recipes.cli", "--config", "cifar10_resnet32_one", "--fake-data",
         "--epochs", "1", "--max-steps", "2", "--methods", "baseline,one", "--out", str(run), "--no-progress",
         "--set", "batch_size=8", "--set", "model=resnet20", "--set", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert {r["config"]["method"] for r in results["runs"]} == {"baseline", "one"}
