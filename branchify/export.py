"""Saving and loading the deployed model: one folder, one side file, no framework needed.

What is deployed is ``model.export(leaf)`` - an instance of the original class. :func:`save_deployed`
writes its ``state_dict`` (``model.pt`` with ``torch.save``, or ``model.safetensors``) and the side
file ``branchify.json``; :func:`load_deployed` loads it back, strictly, into a fresh instance of
that class. Every writer of the package uses this one schema (the Lightning callback, the Hugging
Face wrapper - whose weights go through ``save_pretrained`` - and the recipes):

    {"schema": "branchify.export/1", "class": "torchvision.models.resnet.ResNet",
     "weights": "model.pt", "format": "torch", "leaf": 0, "spec": {"splits": ["layer4"], ...}}

``format`` is ``"torch"``, ``"safetensors"`` or ``"hf"`` (a ``save_pretrained`` folder, ``weights``
is ``null``: reload with ``from_pretrained``); ``leaf`` and ``spec`` say which leaf of which tree it
was (``null`` for a model that was never branched, e.g. a baseline). Writers add their own keys
beside these (the recipes: ``model``, ``num_classes``, ``in_channels``, ``method``; Lightning: the
epoch and step). Folders written before this schema still load: a ``branchify.json`` without
``schema`` (the Lightning and Hugging Face integrations) and the recipes' ``model.json`` with
``model.safetensors`` beside it.

This module imports only torch (and safetensors when that format is used).

Examples:
    >>> import torchvision, branchify as bf
    >>> model, _ = bf.method("one", torchvision.models.resnet18(num_classes=10))   # doctest: +SKIP
    >>> save_deployed(model.export(), "student", leaf=0, spec=model.spec)           # doctest: +SKIP
    >>> net = load_deployed("student", torchvision.models.resnet18(num_classes=10))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BranchifyError

__all__ = ["FORMATS", "INFO_FILE", "SCHEMA", "WEIGHTS", "ExportError", "class_name", "load_deployed",
           "load_state_dict", "read_info", "save_deployed", "write_info"]

SCHEMA = "branchify.export/1"
"""The side file's schema version (its ``"schema"`` key)."""

INFO_FILE = "branchify.json"
"""The side file every writer produces."""

LEGACY_RECIPE_FILE = "model.json"
"""The recipes' side file before :data:`SCHEMA` (read, never written)."""

WEIGHTS = {"torch": "model.pt", "safetensors": "model.safetensors"}
"""Weights file per format written by :func:`save_deployed`."""

FORMATS = (*WEIGHTS, "hf")
"""Every ``format`` the side file can name (``"hf"``: a ``save_pretrained`` folder)."""

_CORE_KEYS = ("schema", "class", "weights", "format", "leaf", "spec")


class ExportError(BranchifyError, ValueError):
    """A deployed model cannot be saved or loaded as asked (names the format, key or file to fix)."""


def class_name(obj: Any) -> str:
    """``"module.QualName"`` of a class or of an instance's class (what the side file records).

    Examples:
        >>> class_name(torch.nn.Linear(2, 2))
        'torch.nn.modules.linear.Linear'
    """
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def write_info(directory: str | os.PathLike, module_class: Any, *, format: str, leaf: int | None = None,
               spec: Any = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``branchify.json`` into ``directory`` (the weights are written by the caller) and return it.

    Args:
        directory: the export folder (created if missing).
        module_class: the deployed model's class, or an instance of it.
        format: one of :data:`FORMATS`.
        leaf: the exported leaf (``None``: not from a branched model).
        spec: the tree (a :class:`~branchify.Spec` or its dict).
        extra: more keys for the writer's own use; they may not replace the schema's keys.

    Examples:
        >>> import tempfile
        >>> write_info(tempfile.mkdtemp(), torch.nn.Linear, format="hf", leaf=1)["weights"] is None
        True
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    clash = sorted(set(extra or {}) & set(_CORE_KEYS))
    if clash:
        raise ExportError(f"extra keys {clash} would replace keys of the {SCHEMA} side file; rename them")
    info = {"schema": SCHEMA, "class": class_name(module_class), "weights": WEIGHTS.get(format), "format": format,
            "leaf": None if leaf is None else int(leaf),
            "spec": spec.to_dict() if hasattr(spec, "to_dict") else spec, **(extra or {})}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def save_deployed(module: nn.Module, directory: str | os.PathLike, *, format: str = "torch",
                  leaf: int | None = None, spec: Any = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``module``'s ``state_dict`` (CPU, contiguous copies) and ``branchify.json``; return the weights path.

    Examples:
        >>> save_deployed(model.export(), "student", format="safetensors")   # doctest: +SKIP
        PosixPath('student/model.safetensors')
    """
    if format not in WEIGHTS:
        raise ExportError(f"format must be one of {sorted(WEIGHTS)}, got {format!r} (a Hugging Face model "
                          f"saves its weights with save_pretrained, then write_info(..., format='hf'))")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS[format]
    if format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    write_info(out, module, format=format, leaf=leaf, spec=spec, extra=extra)
    return path


def read_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The side file of an export folder in the current schema, whichever version wrote it.

    Examples:
        >>> read_info("student")["class"]                                      # doctest: +SKIP
        'torchvision.models.resnet.ResNet'
    """
    out = Path(directory)
    if (out / INFO_FILE).is_file():
        info = json.loads((out / INFO_FILE).read_text())
        if "schema" in info:
            if info["schema"] != SCHEMA:
                raise ExportError(f"{out / INFO_FILE} has schema {info['schema']!r}; this branchify reads "
                                  f"{SCHEMA!r} (and the files written before it)")
            return info
        if "weights" in info and "format" in info:  # the Lightning integration's file
            return {"schema": SCHEMA, **info}
        return {"schema": SCHEMA, **info, "weights": None, "format": "hf"}  # the Hugging Face wrapper's file
    if (out / LEGACY_RECIPE_FILE).is_file():
        info = json.loads((out / LEGACY_RECIPE_FILE).read_text())
        return {"schema": SCHEMA, "leaf": None, "spec": None, **info, "weights": WEIGHTS["safetensors"],
                "format": "safetensors"}
    raise FileNotFoundError(f"{out} has no {INFO_FILE} (nor an older {LEGACY_RECIPE_FILE}): give the folder "
                            f"save_deployed, save_target or save_exported wrote")


def load_state_dict(directory: str | os.PathLike, info: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The saved ``state_dict`` of an export folder (on the CPU).

    Examples:
        >>> net.load_state_dict(load_state_dict("student"), strict=True)         # doctest: +SKIP
    """
    out = Path(directory)
    info = read_info(out) if info is None else info
    if info["format"] == "hf":
        raise ExportError(f"{out} is a Hugging Face save_pretrained folder: reload it with "
                          f"{info['class'].rpartition('.')[2]}.from_pretrained({str(out)!r})")
    if info["format"] == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(out / info["weights"]))
    return torch.load(out / info["weights"], map_location="cpu", weights_only=True)


def load_deployed(directory: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load an export folder into ``model`` (an instance of the saved class), strictly; return ``model``.

    Examples:
        >>> net = load_deployed("student", TinyNet(num_classes=10))             # doctest: +SKIP
    """
    info = read_info(directory)
    name = class_name(model)
    if info["class"] != name and info["class"].rpartition(".")[2] != type(model).__qualname__:
        raise TypeError(f"{directory} holds a {info['class']} but the model given is a {name}; pass an instance "
                        f"of {info['class']} built with the original constructor arguments")
    model.load_state_dict(load_state_dict(directory, info), strict=True)
    return model
