"""Every shipped CIFAR config parses and trains 2 steps on fake CIFAR-shaped data."""
from __future__ import annotations

import pytest
import torch

from branchify.recipes.config import CONFIG_DIR, RunConfig
from branchify.recipes.train import train
from branchify.recipes.zoo import build_model

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_is_a_config_for_every_method_on_both_cifars():
    names = {p.stem for p in CONFIGS}
    for ds in ("cifar10", "cifar100"):
        for m in ("baseline", "dml", "cl_ilr", "one", "okddip", "tsa", "u_tsa", "ahbf"):
            assert f"{ds}_resnet32_{m}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_two_steps_on_fake_data(path):
    cfg = RunConfig.from_yaml(path)
    assert cfg.epochs == 300 and cfg.dataset in ("cifar10", "cifar100")
    smoke = cfg.replace(fake_data=True, fake_batches=2, batch_size=4, epochs=1, device="cpu")
    torch.manual_seed(0)
    res = train(smoke, progress=False)
    assert len(res.history) == 1 and res.history[0]["epoch"] == 1
    n_test = 4 * 2  # fake_batches x batch_size images in the fake test set
    for acc in (res.target_acc, *res.leaf_accs):  # accuracies are counts of correct test images
        assert abs(acc * n_test / 100 - round(acc * n_test / 100)) < 1e-6
    n_leaves = len(res.leaf_accs)
    assert n_leaves == (1 if cfg.method == "baseline" else {"dml": 2, "one": 3, "cl_ilr": 3}.get(cfg.method, 4))
    if cfg.method == "baseline":
        assert res.trained_params == res.deployed_params
    else:  # the tree trains more than it deploys; the deployed model is the original ResNet-32
        plain = build_model("resnet32", 10 if cfg.dataset == "cifar10" else 100, 3)
        assert res.trained_params > res.deployed_params == sum(p.numel() for p in plain.parameters())


def test_unknown_config_keys_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet32\nepoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['epoch'\]"):
        RunConfig.from_yaml(bad)
