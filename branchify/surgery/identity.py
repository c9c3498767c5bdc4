"""Make a copy of a residual block start as the identity, and check that it does.

A residual block computes ``x + f_1(x) + ...`` (or ``act(x + f(x))`` after non-negative
activations); it is the identity when every residual branch ``f_i`` outputs 0. The first of these
that makes the block the identity is used (each is undone if it does not):

1. the block's own ``zero_init_last()`` (timm's residual blocks have one);
2. its layer-scale parameters at 0 (``gamma``, ``layer_scale``, ``ls.gamma``, ``lambda1``: the
   per-channel scale at the end of a ConvNeXt / CaiT / DINOv2 branch);
3. the scale of its last normalisation layer at 0, when no projection is registered after it
   (the "zero-init residual" of Goyal et al. 2017: the last BatchNorm of a ResNet / MobileNet
   block, which keeps its shift at 0);
4. the last projection of each residual branch at 0, branch by branch from the block's end: the
   attention output and the MLP down projection of a transformer layer (weight and bias), or -
   where a normalisation layer reads that projection's output directly (conv + BatchNorm) - that
   layer's scale and shift (a zero conv feeding BatchNorm would leave its shift and receive no
   gradient). A branch is a submodule whose output has as many elements as the block's; one that
   ends before the previous branch starts is the next.

The check runs the block (eval mode, no gradients) on ``call`` - the arguments the block received
in a real forward (:func:`~branchify.surgery.block_calls.record_calls`), with its main input
replaced by the block's own output, which is what a copy appended after it receives. Without a
recorded call (a model that cannot be run on a synthesised input) a random non-negative input of
the shape the block's first layer reads is used.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .block_calls import Call, first_tensor

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
_SCALE = re.compile(r"(^|\.)(gamma(_\d)?|layer_scale\w*|lambda\d|ls\d?\.(gamma|scale))$")
_TOL = 1e-5


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORMS) or "norm" in type(m).__name__.lower()


def _zero(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.zero_()


def probe_shape(block: nn.Module) -> tuple[int, ...] | None:
    """An input shape the block accepts, read off its first layer (None if unknown); only the
    fallback when no forward of the model could be recorded.

    Examples:
        >>> probe_shape(nn.Sequential(nn.Conv2d(4, 4, 3)))
        (2, 4, 16, 16)
    """
    for m in block.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (2, m.in_channels) + (16,) * (m.weight.dim() - 2)
        if isinstance(m, nn.BatchNorm2d):
            return (2, m.num_features, 16, 16)
        if isinstance(m, nn.Linear):
            return (2, 4, m.in_features)
        if isinstance(m, nn.LayerNorm):
            return (2, 4, *m.normalized_shape)
    return None


def _run(block: nn.Module, call: Call | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(input, output)`` of the block on the recorded call (main input := the block's output)."""
    flags = [m.training for m in block.modules()]
    block.eval()
    try:
        with torch.no_grad():
            if call is None:
                shape = probe_shape(block)
                if shape is None:
                    return None
                x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
                x = x.to(next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32))
                out = block(x)
            else:
                x = call.hidden_out if call.hidden_out is not None else call.hidden_in
                args, kwargs = _with_input(call, x)
                out = block(*args, **kwargs)
        y = first_tensor(out)
        return (x, y) if y is not None else None
    except Exception:  # not callable this way: not a block whose identity can be checked
        return None
    finally:
        for m, f in zip(block.modules(), flags):
            m.training = f


def _with_input(call: Call, x: torch.Tensor) -> tuple[tuple, dict]:
    """The call's arguments with its main input (its first tensor argument) replaced by ``x``."""
    args, kwargs = list(call.args), dict(call.kwargs)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            args[i] = x
            return tuple(args), kwargs
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            kwargs[k] = x
            break
    return tuple(args), kwargs


def is_identity(block: nn.Module, call: Call | None = None) -> bool:
    """Whether ``block`` returns its main input unchanged on ``call`` (to 1e-5 of the input's largest
    magnitude; an all-zero input proves nothing and fails).

    Examples:
        >>> is_identity(nn.Sequential(nn.ReLU()))   # no layer says what input it takes
        False
    """
    res = _run(block, call)
    if res is None:
        return False
    x, y = res
    if y.shape != x.shape:
        return False
    scale = float(x.abs().max()) if x.numel() else 0.0
    return scale > 0 and bool((y.double() - x.double()).abs().max() <= _TOL * scale)


def _own_zero_init(block: nn.Module, call: Call | None) -> str | None:
    fn = getattr(block, "zero_init_last", None)
    if not callable(fn):
        return None
    fn()
    return "its own zero_init_last()"


def _layer_scales(block: nn.Module, call: Call | None) -> str | None:
    owners = {id(p) for m in block.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    names = [n for n, p in block.named_parameters() if _SCALE.search(n) and id(p) not in owners]
    for n in names:
        _zero(block.get_parameter(n).data)
    return f"layer scale {names} at 0" if names else None


def _last_norm_scale(block: nn.Module, call: Call | None) -> str | None:
    mods = list(block.named_modules())
    norms = [i for i, (_, m) in enumerate(mods) if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None]
    projections = [i for i, (_, m) in enumerate(mods)
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
    if not norms or (projections and projections[-1] > norms[-1]):
        return None  # no norm closes the block (a ConvNeXt's LayerNorm comes before its MLP)
    name, norm = mods[norms[-1]]
    _zero(norm.weight.data)
    return f"the scale of its last normalisation layer {name!r} at 0"


def _record(block: nn.Module, call: Call) -> dict[str, list]:
    """``path -> [start, end, input, output]`` of every submodule in one run of the block on ``call``."""
    rec: dict[str, list] = {}
    clock = [0]
    handles = []
    for path, m in block.named_modules():
        if not path:
            continue

        def pre(mod, args, kwargs, path=path):
            clock[0] += 1
            rec.setdefault(path, [clock[0], -1, first_tensor((args, tuple(kwargs.values()))), None])

        def post(mod, args, kwargs, out, path=path):
            clock[0] += 1
            if rec[path][1] < 0:
                rec[path][1], rec[path][3] = clock[0], first_tensor(out)

        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    try:
        _run(block, call)
    finally:
        for h in handles:
            h.remove()
    return rec


def _silence(block: nn.Module, path: str, rec: dict[str, list], numel: int) -> str | None:
    """Zero the last projection of the branch at ``path`` (or the norm that reads it directly). A
    projection that ran and output other than ``numel`` elements (Swin V2's position-bias MLP,
    registered after the attention's output projection) does not close the branch and is passed over."""
    projections = [(n, s) for n, s in block.get_submodule(path).named_modules()
                   if isinstance(getattr(s, "weight", None), torch.Tensor) and s.weight.dim() >= 2
                   and (rec.get(f"{path}.{n}" if n else path, [None] * 4)[3] is None
                        or rec[f"{path}.{n}" if n else path][3].numel() == numel)]
    if not projections:
        return None
    name, proj = projections[-1]
    full = f"{path}.{name}" if name else path
    out = rec.get(full, [None] * 4)[3]
    for npath, r in rec.items():
        norm = block.get_submodule(npath)
        if out is not None and r[2] is out and _is_norm(norm) and getattr(norm, "weight", None) is not None:
            before = copy.deepcopy(norm.state_dict())
            _zero(norm.weight.data, getattr(norm, "bias", None))
            if _silent(norm, out):
                return f"{npath}.weight/bias"
            norm.load_state_dict(before)  # a scale of (1 + weight), as Gemma's RMSNorm: zero the projection
            break
    _zero(proj.weight.data, proj.bias.data if isinstance(getattr(proj, "bias", None), torch.Tensor) else None)
    return f"{full}.weight" + ("/bias" if isinstance(getattr(proj, "bias", None), torch.Tensor) else "")


def _silent(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm`` now outputs 0 on ``x`` (eval mode)."""
    was = norm.training
    try:
        with torch.no_grad():
            y = first_tensor(norm.eval()(x))
        return y is not None and not bool(y.abs().gt(0).any())
    except Exception:  # a norm that cannot be called on its own: trust the block check
        return True
    finally:
        norm.train(was)


def silence_branches(block: nn.Module, call: Call | None) -> str | None:
    """Strategy 4 of the module docstring: silence residual branches from the block's end until
    the block is the identity on ``call``.

    Examples:
        >>> silence_branches(llama_layer, call)   # doctest: +SKIP
        'the last projection of each residual branch at 0 (mlp.down_proj.weight, self_attn.o_proj.weight)'
    """
    if call is None:
        return None
    x = call.hidden_out if call.hidden_out is not None else call.hidden_in
    rec = _record(block, call)
    branches = sorted(((p, r) for p, r in rec.items() if r[3] is not None and r[3].numel() == x.numel()
                       and not _is_norm(block.get_submodule(p))
                       and any(True for _ in block.get_submodule(p).parameters())),
                      key=lambda pr: (-pr[1][1], -pr[0].count(".")))
    limit, zeroed = float("inf"), []
    for path, (start, end, _, _) in branches:
        if end > limit:
            continue
        what = _silence(block, path, rec, x.numel())
        if what is None:
            continue
        zeroed.append(what)
        limit = start
        if is_identity(block, call):
            break
    return f"the last projection of each residual branch at 0 ({', '.join(zeroed)})" if zeroed else None


STRATEGIES = (_own_zero_init, _layer_scales, _last_norm_scale, silence_branches)


def identity_init_how(block: nn.Module, call: Call | None = None) -> str | None:
    """Make ``block`` start as the identity (see the module docstring); what was set to 0, or
    ``None`` (the block then is exactly as it was).

    Examples:
        >>> from torchvision.models.resnet import BasicBlock
        >>> identity_init_how(BasicBlock(8, 8))
        "the scale of its last normalisation layer 'bn2' at 0"
    """
    before = copy.deepcopy(block.state_dict())
    for strategy in STRATEGIES:
        with torch.no_grad():
            how = strategy(block, call)
        if how is not None and is_identity(block, call):
            return how
        block.load_state_dict(before)
    return None


def identity_init(block: nn.Module, call: Call | None = None) -> bool:
    """:func:`identity_init_how` as a yes/no.

    Examples:
        >>> from torchvision.models.resnet import BasicBlock
        >>> blk = BasicBlock(8, 8)
        >>> identity_init(blk), float(blk.bn2.weight.abs().sum())
        (True, 0.0)
    """
    return identity_init_how(block, call) is not None
