"""Run a model once on an example input made from its own traced graph, recording module calls.

Deepening (AHBF) needs facts about real blocks: which ones keep the shape of their input, and
whether a copy really starts as the identity on what the block receives. Both are read off one
forward of the model (a deep copy, in training mode - batch statistics keep the activations of a
freshly initialised deep net from fading - without gradients) on a synthesised input:

- every required placeholder of the traced graph gets a tensor for the first layer that reads it:
  token ids (``randint`` below the vocabulary) for an ``nn.Embedding``, an image of the model's
  declared size for an ``nn.ConvNd`` (an ``image_size`` / ``img_size`` attribute, a Hugging Face
  ``config.image_size``, timm's ``pretrained_cfg["input_size"]``), then 64, 224 and 299 pixels
  (the next size is tried when a forward fails: a timm model made with another ``img_size`` than
  its ``pretrained_cfg`` says; Inception v3's training-mode aux head needs 299), a
  ``(2, in_features)`` matrix for an ``nn.Linear``. A signal read by an ``nn.Conv1d`` is as long
  as the model's config declares (``max_source_positions`` frames times the convolutions'
  strides: Whisper checks it), else as the image sizes; one read by a single-channel
  ``nn.Conv1d`` (raw audio: wav2vec2, HuBERT and WavLM add the channel themselves) is tried as
  ``(2, length)`` too, and as one second at 16 kHz;
- forward pre-hooks and hooks (with keyword arguments) record, for each chosen module, the
  arguments it was called with, what it returned, and when it started and ended in the forward.

Training mode would let LayerDrop skip whole layers at random (wav2vec2, BART: a ``layerdrop``
probability on the config or the encoder), so the copy runs with every ``layerdrop`` at 0.

Examples:
    >>> calls = record_calls(torchvision.models.resnet18(), paths=["layer4.1"])   # doctest: +SKIP
    >>> calls["layer4.1"].hidden_in.shape, calls["layer4.1"].hidden_out.shape      # doctest: +SKIP
    (torch.Size([2, 512, 2, 2]), torch.Size([2, 512, 2, 2]))
"""
from __future__ import annotations

import copy
import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from .partition import list_split_points
from .tracing import trace

_SEQ = 8
"""Token length of a synthesised text input."""


@dataclass
class Call:
    """One recorded call of a module: its arguments, its output, and its place in the forward."""

    args: tuple
    kwargs: dict
    out: Any = None
    start: int = 0
    end: int = -1
    count: int = 0
    tuple_out: bool = False

    @property
    def hidden_in(self) -> torch.Tensor | None:
        """The block's main input: its first tensor argument (positional, else keyword)."""
        return first_tensor((self.args, tuple(self.kwargs.values())))

    @property
    def hidden_out(self) -> torch.Tensor | None:
        """The block's main output: the output itself, or the first tensor of a tuple / dict output."""
        return first_tensor(self.out)

    def keeps_shape(self) -> bool:
        """Whether the main output has the main input's shape and dtype (a block copies can follow)."""
        x, y = self.hidden_in, self.hidden_out
        return x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype


class Calls(dict):
    """``path -> Call``, and ``traced``: the module paths the traced graph runs in (a module inside
    a tracer's leaf module - a Hugging Face layer's attention - is not one)."""

    traced: frozenset = frozenset()


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in ``value`` (depth first through tuples, lists and dicts).

    Examples:
        >>> first_tensor((None, {"a": torch.zeros(2)})).shape
        torch.Size([2])
    """
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for v in items:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def _declared_size(model: nn.Module) -> list[int]:
    """Image sizes to try: the model's declared one first (timm's ``pretrained_cfg`` keeps 224 when
    the model was made with another ``img_size``, so the others follow), then 64, 224 and 299."""
    declared = None
    for m in model.modules():
        for attr in ("image_size", "img_size"):
            v = getattr(m, attr, None)
            if declared is None and (isinstance(v, int) or (isinstance(v, (tuple, list)) and v
                                                            and isinstance(v[0], int))):
                declared = int(v if isinstance(v, int) else v[0])
    size = getattr(getattr(model, "config", None), "image_size", None)
    if declared is None and (isinstance(size, int) or (isinstance(size, (tuple, list)) and size)):
        declared = int(size if isinstance(size, int) else size[0])
    cfg = getattr(model, "pretrained_cfg", None)
    if declared is None and isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        declared = int(cfg["input_size"][-1])
    return list(dict.fromkeys(([declared] if declared is not None else []) + [64, 224, 299]))


def _declared_length(model: nn.Module) -> int | None:
    """The signal length the config declares: ``max_source_positions`` times the Conv1d strides."""
    frames = getattr(getattr(model, "config", None), "max_source_positions", None)
    if not isinstance(frames, int):
        return None
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            frames *= m.stride[0]
    return frames


def _mono_signal(gm: fx.GraphModule) -> bool:
    """Whether some required input is first read by a single-channel ``nn.Conv1d`` (raw audio)."""
    return any(isinstance(layer := _first_layer(gm, n), nn.Conv1d) and layer.in_channels == 1
               for n in gm.graph.nodes if n.op == "placeholder" and not n.args)


def _first_layer(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The first Embedding / ConvNd / Linear reached from ``node`` through its users."""
    queue, seen = deque([node]), {node}
    while queue:
        for user in queue.popleft().users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                for m in gm.get_submodule(str(user.target)).modules():
                    if isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                        return m
            queue.append(user)
    return None


def example_inputs(gm: fx.GraphModule, model: nn.Module, size: int, flat: bool = False) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model``: one tensor per required placeholder of its traced graph
    (``flat``: a single-channel signal as ``(2, length)``).

    Examples:
        >>> {k: v.shape for k, v in example_inputs(trace(net), net, 64).items()}   # doctest: +SKIP
        {'x': torch.Size([2, 3, 64, 64])}
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    g = torch.Generator().manual_seed(0)
    out = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.args:  # a placeholder with a default is optional
            continue
        layer = _first_layer(gm, node)
        if isinstance(layer, nn.Embedding):
            x = torch.randint(0, layer.num_embeddings, (2, _SEQ), generator=g)
        elif isinstance(layer, nn.Conv1d):
            length = _declared_length(model) or size
            shape = (2, length) if flat and layer.in_channels == 1 else (2, layer.in_channels, length)
            x = torch.randn(*shape, generator=g).to(dtype)
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            x = torch.randn(2, layer.in_channels, *[size] * (layer.weight.dim() - 2), generator=g).to(dtype)
        elif isinstance(layer, nn.Linear):
            x = torch.randn(2, layer.in_features, generator=g).to(dtype)
        else:
            raise ValueError(f"no layer reads input {node.name!r} that says what it expects")
        out[str(node.target)] = x.to(device)
    return out


def _every_layer_runs(work: nn.Module) -> None:
    """Set every LayerDrop probability of ``work`` (a copy) to 0: its config's and its modules' own."""
    configs = {id(c): c for m in work.modules() if (c := getattr(m, "config", None)) is not None}
    for owner in [*configs.values(), *work.modules()]:
        for name in [n for n in vars(owner) if n.endswith("layerdrop")]:
            if isinstance(getattr(owner, name), float) and getattr(owner, name) > 0:
                setattr(owner, name, 0.0)


def _cloned(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _hooks(model: nn.Module, paths: Iterable[str], calls: dict[str, Call], clock: list[int]) -> list:
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def pre(m, args, kwargs, path=path):
            clock[0] += 1
            if path in calls:
                calls[path].count += 1
            else:
                calls[path] = Call(args=_cloned(args), kwargs=_cloned(dict(kwargs)), start=clock[0], count=1)

        def post(m, args, kwargs, out, path=path):
            clock[0] += 1
            if calls[path].count == 1:
                hidden = first_tensor(out)  # a later in-place op must not change what was recorded
                calls[path].out, calls[path].end = None if hidden is None else hidden.clone(), clock[0]
                calls[path].tuple_out = isinstance(out, (tuple, list))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


def record_calls(model: nn.Module, paths: Iterable[str] | None = None, tracer: fx.Tracer | None = None
                 ) -> Calls:
    """Run a deep copy of ``model`` once (training mode, no grad) on a synthesised input and record the calls
    of the modules at ``paths`` (every module when ``None``); see the module docstring.

    Raises:
        ValueError: no input could be made for the model, or it failed on every size tried.
    """
    work = copy.deepcopy(model).train()  # batch statistics keep a fresh deep net's activations O(1)
    _every_layer_runs(work)
    if any(p.is_meta for p in work.parameters()):
        raise ValueError("the model is on the meta device, so it cannot be run")
    gm = trace(copy.deepcopy(work), tracer)
    paths = [p for p, _ in work.named_modules() if p] if paths is None else list(dict.fromkeys(paths))
    error: Exception | None = None
    sizes = _declared_size(work)
    for size, flat in [(s, False) for s in sizes] + ([(s, True) for s in sizes + [16000]] if _mono_signal(gm) else []):
        calls = Calls()
        calls.traced = frozenset(list_split_points(gm))
        handles = _hooks(work, paths, calls, [0])
        try:
            inputs = example_inputs(gm, work, size, flat)
            if "use_cache" in inspect.signature(work.forward).parameters:
                inputs["use_cache"] = False  # a cache the layers would write into is no input
            with torch.no_grad():
                work(**inputs)
            return calls
        except Exception as exc:  # the next size may fit (a net that needs larger images)
            error = exc
        finally:
            for h in handles:
                h.remove()
    raise ValueError(f"running {type(model).__name__} on a synthesised input failed: "
                     f"{type(error).__name__}: {error}")

