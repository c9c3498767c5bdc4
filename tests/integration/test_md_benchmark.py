"""benchmarks.md_accuracy: two variants x one seed as concurrent recipes.md subprocesses on real
Fashion-MNIST (tiny settings), the table and results.json, --summarise rebuilding the same table
from the run folders, and the errors for bad variants and bad recipes.md --runs."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from benchmarks import md_accuracy
from branchify.recipes import md

from fashion_mnist import needs_fashion_mnist as needs_data

MODELS = ["resnet20", "mobilenetv2_0.5"]
# One independent epoch, then one distillation epoch (one soft-label pass), on 100 images.
TINY = ["--subset", "100", "--test-subset", "100", "--epochs", "2", "--t-in", "1", "--t-d", "1",
        "--batch-size", "50"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("md_bench")
    argv = ["--models", ",".join(MODELS), "--seeds", "0", "--variants", "independent,md:kd-t2",
            "--workers", "2", "--out", str(out), "--", *TINY]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = md_accuracy.main(argv)
    return {"out": out, "rc": rc, "printed": printed.getvalue()}


def _table(summary: str) -> list[list[str]]:
    """The accuracy table of summary.md as rows of cells (header first, separator dropped)."""
    block = summary.split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
    return [rows[0], *rows[2:]]


@needs_data
def test_two_variants_run_concurrently_and_are_tabulated(bench):
    out, printed = bench["out"], bench["printed"]
    assert bench["rc"] == 0, printed
    assert "[" in printed and "1/2]" in printed and "2/2]" in printed  # one progress line per job
    for name in ("independent-seed0", "md_kd-t2-seed0"):
        assert (out / "runs" / name / "results.json").is_file()
        assert (out / "runs" / f"{name}.log").stat().st_size > 0
    job = json.loads((out / "runs" / "md_kd-t2-seed0" / "job.json").read_text())
    assert job["command"][job["command"].index("--runs") + 1] == "md" and "--kd-t2" in job["command"]
    assert job["command"][-len(TINY):] == TINY and job["returncode"] == 0

    summary = (out / "summary.md").read_text()
    assert summary.startswith("MD benchmark: fashion_mnist, 100 training images, 100 test images, 2 epochs, "
                              "MD T_in=1 T_d=1 t=3.0, batch 50")
    assert "machine: " in summary.splitlines()[0]
    table = _table(summary)
    assert table[0] == ["peer", "independent (%)", "md:kd-t2 (%)", "md:kd-t2 vs independent"]
    assert [r[0] for r in table[1:]] == [*MODELS, "ensemble"]
    for row in table[1:]:
        ind, paper = float(row[1]), float(row[2])  # one seed: no "±"
        assert float(row[3]) == pytest.approx(paper - ind, abs=0.011)
    assert "| independent | 1 |" in summary and "| md:kd-t2 | 1 |" in summary  # the timing table
    assert summary in printed  # the tables are printed too

    results = json.loads((out / "results.json").read_text())
    assert results["models"] == MODELS and results["variants"] == ["independent", "md:kd-t2"]
    assert results["settings"]["epochs"] == "2" and results["settings"]["T_in"] == "1"
    assert {(j["variant"], j["kind"], j["seed"]) for j in results["jobs"]} == {
        ("independent", "independent", 0), ("md:kd-t2", "md", 0)}
    for j in results["jobs"]:
        assert len(j["acc"]) == 2 and all(0.0 <= a <= 100.0 for a in j["acc"])
        assert 0.0 <= j["ensemble_acc"] <= 100.0 and j["seconds"] > 0
    by_variant = {j["variant"]: j for j in results["jobs"]}
    assert by_variant["independent"]["cycles"] == []
    (cycle,) = by_variant["md:kd-t2"]["cycles"]  # epoch 1 starts the one distillation phase
    assert cycle["epoch"] == 1 and sum(cycle["weights"]) == pytest.approx(1.0)
    ens = results["summary"][-1]
    assert ens["peer"] == "ensemble" and ens["variants"]["md:kd-t2"]["n"] == 1
    assert ens["vs_independent"]["md:kd-t2"] == pytest.approx(
        by_variant["md:kd-t2"]["ensemble_acc"] - by_variant["independent"]["ensemble_acc"])


@needs_data
def test_summarise_rebuilds_the_same_table_from_the_run_folders(bench, capsys):
    out = bench["out"]
    before = (out / "summary.md").read_text()
    jobs_before = json.loads((out / "results.json").read_text())["jobs"]
    (out / "summary.md").unlink()
    (out / "results.json").unlink()
    assert md_accuracy.main(["--summarise", "--out", str(out)]) == 0
    assert (out / "summary.md").read_text() == before
    assert json.loads((out / "results.json").read_text())["jobs"] == jobs_before
    assert _table(before)[0][0] == "peer" and "| ensemble |" in capsys.readouterr().out


def test_bad_variants_give_clear_errors(tmp_path):
    cases = {
        "independent,mdd": "unknown run kind 'mdd'; a variant is a run kind out of independent, md, md_fixed",
        "md:no-such-flag": "recipes.md has no flag --no-such-flag; valid flags: batch-size",
        "md:seed=3": "--seed is set by the benchmark",
        "md_fixed@zero": "seeds after '@' must be integers",
    }
    for variants, message in cases.items():
        with pytest.raises(SystemExit) as err:
            md_accuracy.main(["--variants", variants, "--out", str(tmp_path / "x")])
        assert message in str(err.value), variants
    with pytest.raises(SystemExit, match="--out is set by the benchmark"):
        md_accuracy.main(["--out", str(tmp_path / "x"), "--", "--out=elsewhere"])
    assert not (tmp_path / "x").exists()  # nothing ran
    with pytest.raises(SystemExit, match="no finished runs"):
        md_accuracy.main(["--summarise", "--out", str(tmp_path / "empty")])


def test_variant_parsing_and_folder_names():
    assert md_accuracy.parse_variant("md:kd-t2:temperature=4@0+2") == (
        "md:kd-t2:temperature=4", "md", ["--kd-t2", "--temperature", "4"], [0, 2])
    assert md_accuracy.parse_variant("independent") == ("independent", "independent", [], None)
    assert md_accuracy.folder_name("md:temperature=4", 1) == "md_temperature-4-seed1"
    jobs = md_accuracy.make_jobs(["independent", "md", "md_fixed@0"], [0, 1], md_accuracy.Path("o"))
    assert [(j.variant, j.seed) for j in jobs] == [("md", 0), ("md", 1), ("md_fixed", 0),
                                                    ("independent", 0), ("independent", 1)]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "dry"
    assert md_accuracy.main(["--seeds", "0,1", "--variants", "md:kd-t2,independent@1", "--dry-run",
                              "--out", str(out), "--", "--epochs", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"-m branchify.recipes.md --runs md --seed 0 --kd-t2 --out {out}/runs/md_kd-t2-seed0 "
        "--models resnet20,mobilenetv2_0.5 --threads 1 --epochs 3",
        f"-m branchify.recipes.md --runs md --seed 1 --kd-t2 --out {out}/runs/md_kd-t2-seed1 "
        "--models resnet20,mobilenetv2_0.5 --threads 1 --epochs 3",
        f"-m branchify.recipes.md --runs independent --seed 1 --out {out}/runs/independent-seed1 "
        "--models resnet20,mobilenetv2_0.5 --threads 1 --epochs 3"]
    assert not out.exists()


def test_md_runs_validation_and_default():
    assert md.parse_args([]).runs == ["independent", "md"]
    assert md.parse_args(["--fixed-weights"]).runs == ["independent", "md", "md_fixed"]
    assert md.parse_args(["--runs", "md_fixed, independent"]).runs == ["independent", "md_fixed"]
    with pytest.raises(ValueError, match=r"--runs: unknown run kind\(s\) 'mdx'; valid run kinds are: "
                                         r"independent, md, md_fixed"):
        md.parse_runs("md,mdx")
    with pytest.raises(ValueError, match="no run kind given"):
        md.parse_runs(" , ")
    with pytest.raises(SystemExit) as err:  # the command line: argparse's usage error, exit status 2
        md.parse_args(["--runs", "fixed"])
    assert err.value.code == 2


def test_md_table_with_some_run_kinds():
    def result(acc, ens):
        return {"acc": acc, "ensemble_acc": ens, "params": [1e6, 2e6]}

    only_md = md.format_table(["a", "b"], {"md": result([50.0, 60.0], 65.0)})
    assert only_md.splitlines()[0] == "| peer | params | MD (%) |"
    assert only_md.splitlines()[-1] == "| ensemble (mean probs) | 3.000M | 65.00 |"
    both = md.format_table(["a", "b"], {"md_fixed": result([1.0, 2.0], 3.0), "independent": result([40.0, 55.0], 60.0),
                                        "md": result([50.0, 60.0], 65.0)})
    assert both.splitlines()[0] == ("| peer | params | independent (%) | MD (%) | MD fixed a=1,b=2 (%) | "
                                    "MD vs independent |")
    assert both.splitlines()[2] == "| a | 1.000M | 40.00 | 50.00 | 1.00 | +10.00 |"
    assert md.format_weights({"independent": {}}) == ""


def test_jobs_import_this_checkouts_branchify():
    """The jobs run ``python -m branchify.recipes.md``: the folder put on their PYTHONPATH is the one
    that holds the ``branchify`` package (the repository root), not the package folder itself."""
    import branchify

    first = md_accuracy.job_env(1)["PYTHONPATH"].split(os.pathsep)[0]
    assert (md_accuracy.REPO / "branchify" / "__init__.py").is_file()
    assert first == str(md_accuracy.REPO)
    assert md_accuracy.Path(branchify.__file__).resolve().parent.parent == md_accuracy.REPO
