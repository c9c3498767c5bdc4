"""Check a whole comparison before anything trains: names, options, device, seeds.

A typo in the fifth method of a long comparison should fail in a second, not after the first
four trained. :func:`validate_run` checks the dataset and model names against their registries,
every method name against ``baseline`` and :func:`branchify.methods.available_methods`, and
builds every method on a throwaway model exactly as training will (so each option in
``method_args`` is checked by the method's own validation); every problem is reported at once,
each with the nearest valid name.

Examples:
    >>> from branchify.recipes.config import RunConfig
    >>> validate_run(RunConfig(model="resnet20"), ["baseline", "onee"], [0])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    branchify.recipes.preflight.PreflightError: unknown method 'onee'; did you mean 'one'? (valid methods: ...)
"""
from __future__ import annotations

import torch

from ..errors import BranchifyError
from ..methods import MethodError, available_methods, get_preset, nearest
from .config import RunConfig
from .data import DATASETS
from .zoo import MODELS


class PreflightError(BranchifyError, ValueError):
    """Everything wrong with a planned comparison, one problem per line."""


def method_names() -> list[str]:
    """Every name ``--methods`` accepts: ``baseline`` and the registered presets."""
    return ["baseline", *available_methods()]


def canonical_method(name: str) -> str:
    """The registered spelling of ``name`` (``"ONE"`` -> ``"one"``); :class:`PreflightError` if unknown.

    Examples:
        >>> canonical_method("U-TSA")
        'u_tsa'
    """
    if name.strip().lower() == "baseline":
        return "baseline"
    try:
        return get_preset(name).name
    except MethodError:
        key = name.strip().lower().replace("-", "_")
        raise PreflightError(f"unknown method {name!r}{nearest(key, method_names())} (valid methods: "
                             f"{', '.join(method_names())})") from None


def _name_problems(cfg: RunConfig, methods: list[str], seeds: list[int]) -> list[str]:
    problems = []
    if cfg.dataset not in DATASETS:
        problems.append(f"unknown dataset {cfg.dataset!r}{nearest(cfg.dataset, list(DATASETS))} "
                        f"(valid datasets: {', '.join(DATASETS)})")
    if cfg.model not in MODELS:
        problems.append(f"unknown model {cfg.model!r}{nearest(cfg.model, sorted(MODELS))} "
                        f"(valid models: {', '.join(sorted(MODELS))})")
    if not methods:
        problems.append("no methods given; pass --methods, e.g. --methods baseline,one")
    if not seeds:
        problems.append("no seeds given; pass --seeds, e.g. --seeds 0,1,2")
    for what, items in (("method", methods), ("seed", seeds)):
        repeated = sorted({str(i) for i in items if items.count(i) > 1})
        if repeated:
            problems.append(f"{what} {', '.join(repeated)} is listed twice; every (method, seed) runs once")
    try:
        device = torch.device("cpu" if cfg.device == "auto" else cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"device {cfg.device!r} asks for CUDA but torch.cuda.is_available() is False; "
                            f"use --device cpu or auto")
    except RuntimeError as exc:
        problems.append(f"device {cfg.device!r} is not a torch device ({exc}); use auto, cpu, cuda or cuda:N")
    return problems


def validate_run(cfg: RunConfig, methods: list[str], seeds: list[int]) -> list[str]:
    """Raise :class:`PreflightError` listing every problem of the planned runs; else the
    canonical method names (in order).

    Each method in ``methods`` is built with ``cfg.method_args`` on the configured model (on the
    CPU, then thrown away), which runs the method's own option checks.
    """
    from .train import build

    problems = _name_problems(cfg, methods, seeds)
    canonical = []
    for m in methods:
        try:
            canonical.append(canonical_method(m))
        except PreflightError as exc:
            problems.append(str(exc))
    if problems:
        raise PreflightError("\n".join(problems))
    meta = DATASETS[cfg.dataset]
    for m in canonical:
        if m == "baseline":
            continue
        try:
            build(cfg.replace(method=m), meta.num_classes, meta.in_channels)
        except (MethodError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"method {m!r} with method_args {cfg.method_args}: {exc}")
    if problems:
        raise PreflightError("\n".join(problems))
    return canonical
