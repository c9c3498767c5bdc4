"""The README demo in smoke mode: real Fashion-MNIST, every method, table + plots + export."""
from __future__ import annotations

import json

import pytest
import torch

from branchify.recipes import demo
from branchify.recipes.cli import main as cli_main
from branchify.recipes.train import load_exported

from fashion_mnist import needs_fashion_mnist as needs_data


@needs_data
def test_demo_smoke_writes_table_plots_and_a_strictly_reloadable_export(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--smoke", "--out", str(out), "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("Training 4 runs (smoke: ResNet-14") and "processes: about" in text
    table = [line.split() for line in text.splitlines() if line.split()[:1] in (["baseline"], ["dml"], ["one"], ["ahbf"])]
    assert [row[0] for row in table] == ["baseline", "dml", "one", "ahbf"]
    assert "One seed shows" in text and "5-seed gain" in text
    for method, (gain, se) in demo.REFERENCE.items():  # the benchmark's 5-seed gain beside each row
        if method in ("dml", "one", "ahbf"):
            assert f"{gain:+.2f} ± {se:.2f}" in next(" ".join(r) for r in table if r[0] == method)
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    for m in ("baseline", "dml", "one", "ahbf"):
        assert (out / "exported" / m / "model.safetensors").is_file()
        assert runs[m]["export"]["class"] == "CifarResNet" and runs[m]["export"]["max_abs_diff_to_leaf"] < 1e-5
        assert 0 < runs[m]["target_acc"] < 100 and f"{runs[m]['target_acc']:.2f}" in text
    assert runs["one"]["spec"]["fanout"] == [3] and runs["one"]["split_reason"].startswith("default split")
    assert list(runs["ahbf"]["spec"]["deepen"].values()) == [[0, 1, 2, 3]]  # the regime's aux=1
    for name in ("summary.md", "accuracy.png", "trees.png"):
        assert (out / name).stat().st_size > 0
    assert "| baseline |" in (out / "summary.md").read_text()


def test_demo_validates_methods_before_training(tmp_path):
    from branchify.methods import MethodError

    with pytest.raises(MethodError, match="did you mean 'one'"):
        demo.main(["--methods", "baseline,onee", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="must start with baseline"):
        demo.main(["--methods", "dml", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was written, nothing trained


def test_saved_target_reloads_into_the_original_class_and_reproduces_the_leaf(tmp_path):
    import branchify as bf
    from branchify.recipes.config import RunConfig
    from branchify.recipes.data import DATASETS
    from branchify.recipes.train import save_exported
    from branchify.recipes.zoo import resnet20

    torch.manual_seed(0)
    model, okd = bf.method("one", resnet20(num_classes=10, in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for epoch in range(3):
        okd.set_epoch(epoch, 3)
        loss = okd(model(x), y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_exported(model.export(), RunConfig(model="resnet20", method="one"), DATASETS["fashion_mnist"], tmp_path)
    net = load_exported(tmp_path)
    assert type(net).__name__ == "CifarResNet"
    torch.testing.assert_close(net(x), model(x).logits[model.spec.target], atol=1e-5, rtol=0)


def test_cli_runs_a_comparison_on_fake_data(tmp_path, capsys):
    code = cli_main(["--dataset", "cifar10", "--model", "resnet20", "--methods", "baseline,cl_ilr",
                     "--fake-data", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                     "--set", "fake_batches=2", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert "| cl_ilr |" in capsys.readouterr().out
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["method"] == "cl_ilr"
