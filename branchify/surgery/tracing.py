"""Tracing a model into an fx graph, with errors that say what to do when it fails."""
from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch.fx as fx
from torch import nn

from ..errors import BranchifyError
from ..registry import plugin_tracer
from .training_mode import follow_training_mode


class TraceError(BranchifyError, RuntimeError):
    """torch.fx could not trace the model; the message names the module/function and the fix."""


class Tracer(fx.Tracer):
    """An fx tracer with the two escape hatches untraceable models need.

    Args:
        leaf_modules: module paths (``"encoder.layer.3"``) or classes that are recorded as a
            single call instead of being traced through (use for modules with data-dependent
            control flow). A leaf module cannot be a split point's interior.
        autowrap_functions: free functions recorded as one call (e.g. mask builders that
            branch on tensor values).

    Examples:
        >>> tracer = Tracer(leaf_modules=["features.3"], autowrap_functions=[my_mask_fn])
        >>> bm = branchify(model, spec, tracer=tracer)              # doctest: +SKIP
    """

    def __init__(self, leaf_modules: Iterable[str | type] = (),
                 autowrap_functions: Sequence[Callable] = (), **kwargs: Any) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions), **kwargs)
        leaf_modules = list(leaf_modules)
        self.leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed_module_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: D401 - fx hook
        # Remember which module is being traced so a failure can name it.
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module_path is None:  # innermost module wins
                self.failed_module_path = path
            raise


def _package_dirs() -> tuple[Path, ...]:
    """Where torch and branchify are installed: frames under these are not the user's code."""
    import torch
    branchify_dir = Path(__file__).resolve().parents[1]  # this file is branchify/surgery/tracing.py
    return Path(torch.__file__).resolve().parent, branchify_dir


def _is_library_frame(filename: str, library_dirs: tuple[Path, ...]) -> bool:
    # Compared as resolved paths, never as substrings: a user's project may itself live in a
    # folder called ``branchify`` or ``torch`` (a checkout of this repository does).
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):  # "<string>", "<eval>"...: generated code, not the user's file
        return True
    return any(path.is_relative_to(d) for d in library_dirs)


def _deepest_user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch and branchify: where the untraceable code lives."""
    frames = traceback.extract_tb(exc.__traceback__)
    library_dirs = _package_dirs()
    for fr in reversed(frames):
        if not fr.filename.startswith("<") and not _is_library_frame(fr.filename, library_dirs):
            return f"{fr.name}() at {fr.filename}:{fr.lineno}: {fr.line}"
    return f"{frames[-1].name}() at {frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def resolve_tracer(model: nn.Module, tracer: fx.Tracer | None = None) -> fx.Tracer:
    """The tracer branchify uses for ``model``: ``tracer`` if given, else the one its plugin
    provides (the coarse HF tracer, timm's leaf modules...), else a plain :class:`Tracer`.

    :func:`trace`, :func:`~branchify.split_points`, the default split and
    :func:`~branchify.branchify` all resolve the tracer here, so they see the same graph.

    Examples:
        >>> type(resolve_tracer(torchvision.models.resnet18())).__name__     # doctest: +SKIP
        'Tracer'
    """
    if tracer is not None:
        return tracer
    return plugin_tracer(model) or Tracer()


def trace(model: nn.Module, tracer: fx.Tracer | None = None,
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (not mutated) and return a GraphModule over it.

    The GraphModule shares submodules with ``model``. Nodes keep ``meta["nn_module_stack"]``
    so every node can be mapped back to the module path it ran in. Calls recorded with a constant
    ``training`` argument read the module's training flag instead (see
    :mod:`branchify.surgery.training_mode`).

    Without ``tracer``, the model's plugin picks one (see :func:`resolve_tracer`): the same
    graph that :func:`~branchify.branchify` and :func:`~branchify.split_points` cut.

    Raises:
        TraceError: naming the module being traced when it failed, the offending code line,
            and the fix (``Tracer(leaf_modules=[...])`` or ``autowrap_functions=[...]``).
    """
    tracer = resolve_tracer(model, tracer)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except TraceError:  # a tracer that already explains itself (e.g. the HF tracer)
        raise
    except Exception as exc:  # fx raises many types; re-raise one that teaches
        where = getattr(tracer, "failed_module_path", None) or ""
        mod_desc = (f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where
                    else f"the top-level forward of {type(model).__name__}")
        hint_leaf = (f"branchify.Tracer(leaf_modules=['{where}'])" if where
                     else "branchify.Tracer(leaf_modules=[...the offending submodule...])")
        raise TraceError(
            f"torch.fx could not trace {mod_desc}: {type(exc).__name__}: {exc}\n"
            f"  failing code: {_deepest_user_frame(exc)}\n"
            f"  fix: treat it as one opaque call with tracer={hint_leaf} (it then cannot be cut "
            f"inside), or wrap the offending free function with "
            f"branchify.Tracer(autowrap_functions=[fn]); Hugging Face models use the coarse HF "
            f"tracer automatically"
        ) from exc
    follow_training_mode(graph)  # training=self.training arguments follow .train()/.eval()
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class TracedCopy(NamedTuple):
    """A deep copy of a model and the GraphModule traced from it (sharing the copy's modules).

    Attributes:
        source: the model that was copied (never mutated).
        work: the deep copy.
        graph: the copy traced with ``tracer``.
        tracer: the ``tracer`` argument it was traced with (``None``: the model's plugin chose).
    """

    source: nn.Module
    work: nn.Module
    graph: fx.GraphModule
    tracer: fx.Tracer | None

    def made_from(self, model: nn.Module, tracer: fx.Tracer | None) -> bool:
        """Whether this is a copy of ``model`` traced with the same ``tracer`` argument."""
        return self.source is model and self.tracer is tracer


def traced_copy(model: nn.Module, tracer: fx.Tracer | None = None) -> TracedCopy:
    """Deep-copy ``model`` and :func:`trace` the copy, so tracing leaves nothing behind in ``model``.

    The default split reads its choice from one, and :func:`branchify.branchify` cuts the same one
    (``traced=``) instead of copying and tracing the model a second time.

    Examples:
        >>> t = traced_copy(net)                                   # doctest: +SKIP
        >>> t.graph.get_submodule("fc") is t.work.fc, t.source is net   # doctest: +SKIP
        (True, True)
    """
    work = copy.deepcopy(model)
    return TracedCopy(model, work, trace(work, tracer), tracer)


def node_module_path(node: fx.Node) -> str:
    """Module path a node ran in (``''`` for top-level code)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return ""


def node_module_paths(node: fx.Node) -> list[str]:
    """Every enclosing module path of a node, outermost first (itself last for call_module)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values()]
    if node.op == "call_module" and (not paths or paths[-1] != node.target):
        paths.append(str(node.target))
    return paths
