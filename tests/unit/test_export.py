"""branchify.export: the deployed model's folder round-trips exactly, in both weight formats, and
the side files written before its schema (Lightning's and the HF wrapper's ``branchify.json``
without ``schema``, the recipes' ``model.json``) still load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import branchify as bf
from branchify.export import (INFO_FILE, SCHEMA, ExportError, load_deployed, load_state_dict, read_info,
                              save_deployed, write_info)

CLASSES = 5


@pytest.fixture
def branched(tiny_resnet):
    torch.manual_seed(0)
    model, _ = bf.method("one", tiny_resnet(num_classes=CLASSES), model_fn=lambda: tiny_resnet(num_classes=CLASSES))
    return model.eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_round_trip_is_exact_and_reproduces_the_leaf(branched, tiny_resnet, tmp_path, fmt):
    path = save_deployed(branched.export(2), tmp_path, format=fmt, leaf=2, spec=branched.spec, extra={"epoch": 7})
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert path == tmp_path / info["weights"] and path.is_file()
    assert info["schema"] == SCHEMA and info["format"] == fmt and info["leaf"] == 2 and info["epoch"] == 7
    assert info["class"].endswith("TinyCifarResNet") and info["spec"] == branched.spec.to_dict()
    net = load_deployed(tmp_path, tiny_resnet(num_classes=CLASSES)).eval()
    assert _same_state(net, branched.export(2))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), branched(x).logits[2], rtol=1e-5, atol=1e-6)


def test_lightning_side_file_from_before_the_schema_loads(branched, tiny_resnet, tmp_path):
    exported = branched.export()
    torch.save(exported.state_dict(), tmp_path / "model.pt")
    old = {"class": f"{type(exported).__module__}.{type(exported).__qualname__}", "weights": "model.pt",
           "format": "torch", "leaf": 0, "spec": branched.spec.to_dict(), "epoch": 3, "global_step": 12}
    (tmp_path / "branchify.json").write_text(json.dumps(old))
    info = read_info(tmp_path)
    assert info == {"schema": SCHEMA, **old}
    assert _same_state(load_deployed(tmp_path, tiny_resnet(num_classes=CLASSES)), exported)


def test_recipes_model_json_from_before_the_schema_loads(tmp_path):
    from safetensors.torch import save_file

    from branchify.recipes.train import load_exported
    from branchify.recipes.zoo import resnet20

    torch.manual_seed(0)
    net = resnet20(num_classes=10, in_channels=1)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(
        {"model": "resnet20", "num_classes": 10, "in_channels": 1,
         "class": f"{type(net).__module__}.{type(net).__qualname__}", "method": "one"}, indent=2))
    info = read_info(tmp_path)
    assert info["format"] == "safetensors" and info["weights"] == "model.safetensors" and info["leaf"] is None
    assert _same_state(load_exported(tmp_path), net)


def test_recipes_write_the_one_schema(tmp_path):
    from branchify.recipes.config import RunConfig
    from branchify.recipes.data import DATASETS
    from branchify.recipes.train import load_exported, save_exported
    from branchify.recipes.zoo import resnet20

    torch.manual_seed(0)
    net = resnet20(num_classes=10, in_channels=1)
    path = save_exported(net, RunConfig(model="resnet20", method="one"), DATASETS["fashion_mnist"], tmp_path)
    info = json.loads((tmp_path / INFO_FILE).read_text())
    assert path == tmp_path / "model.safetensors" and not (tmp_path / "model.json").exists()
    assert info["schema"] == SCHEMA and info["model"] == "resnet20" and info["method"] == "one"
    assert _same_state(load_exported(tmp_path), net)


def test_hf_side_file_from_before_the_schema_names_from_pretrained(tmp_path):
    (tmp_path / "branchify.json").write_text(json.dumps(
        {"spec": {"splits": ["bert.encoder.layer.1"], "fanout": [3]}, "leaf": 0,
         "class": "transformers.models.bert.modeling_bert.BertForSequenceClassification", "tie_word_embeddings": None}))
    info = read_info(tmp_path)
    assert info["format"] == "hf" and info["weights"] is None and info["leaf"] == 0
    with pytest.raises(ExportError, match=r"BertForSequenceClassification.from_pretrained"):
        load_state_dict(tmp_path)


def test_errors_name_what_to_fix(branched, tmp_path):
    with pytest.raises(ExportError, match=r"format must be one of \['safetensors', 'torch'\], got 'onnx'"):
        save_deployed(branched.export(), tmp_path, format="onnx")
    with pytest.raises(ExportError, match=r"extra keys \['leaf'\] would replace"):
        write_info(tmp_path, torch.nn.Linear, format="torch", extra={"leaf": 3})
    with pytest.raises(FileNotFoundError, match="has no branchify.json"):
        read_info(tmp_path / "nowhere")
    save_deployed(branched.export(), tmp_path)
    with pytest.raises(TypeError, match="holds a .*TinyCifarResNet.*pass an instance"):
        load_deployed(tmp_path, torch.nn.Linear(2, 2))
    info = json.loads((tmp_path / INFO_FILE).read_text())
    (tmp_path / INFO_FILE).write_text(json.dumps({**info, "schema": "branchify.export/99"}))
    with pytest.raises(ExportError, match="schema 'branchify.export/99'"):
        read_info(tmp_path)


def test_importable_without_any_framework():
    code = ("import sys, branchify.export; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'transformers', 'timm', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
