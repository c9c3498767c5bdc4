"""The coarse fx tracer for Hugging Face transformers models (v5 and later).

``torch.fx.symbolic_trace`` cannot trace a transformers 5.x model: the root ``forward`` takes
``**kwargs`` (fx cannot re-create its code object), embeddings slice buffers with symbolic
sizes, the mask builders branch on tensor values and attention layers unpack symbolic shapes.
:class:`HFTracer` traces at the granularity branchify needs instead:

* **Coarse leaves.** Embedding modules and every encoder / decoder layer (the classes in the
  model's ``_no_split_modules``, and the blocks of any ``ModuleList`` of identical blocks) are
  recorded as one ``call_module`` each, so split points are layer paths such as
  ``"bert.encoder.layer.4"`` or ``"model.decoder.layers.1"`` (:mod:`.leaves`).
* **Mask builders are autowrapped.** Every function from ``transformers.masking_utils`` /
  ``transformers.modeling_attn_mask_utils`` and every module-level ``*mask*`` builder that the
  model's modules use becomes one ``call_function`` node, evaluated at run time with real
  tensors (so a padding mask is still computed from the real ``attention_mask``).
* **Input checks become run-time assertions.** ``if <traced condition>: raise ...`` (Whisper's
  check of the ``input_features`` length) takes the branch that does not raise and keeps the
  condition as a ``torch._assert`` (:mod:`.guards`).
* **Configs are constants.** A config (or any other non-tensor object argument; key/value
  caches are refused - the wrapper passes ``use_cache=False``) is referenced
  through a ``get_attr`` node - at its existing path (``bert.config``) when it has one - and is
  never rebuilt. fx would otherwise re-create a dataclass config from its public fields, which
  drops private ones such as ``_attn_implementation`` and silently disables padding masks.
  Tensors created while tracing (``_tensor_constant0``: DeBERTa-v2's bucket sizes) are kept too.
* **Explicit inputs.** The root is traced through a wrapper whose ``forward`` takes the model's
  inputs by name (``input_ids, attention_mask, ...``; see :func:`.default_input_names`) and
  calls the model with ``return_dict=False`` (and ``use_cache=False``), returning the logits.
  The wrapper's prefix is removed afterwards, so qualified names in the graph equal the
  original ``state_dict`` keys. ``tracer.root`` is a shallow view of the HF model (the same
  submodules and parameters) that also holds the trace's constants; the model is not changed.

Attention masks that are left out at run time default to all ones (the same result as
passing ``None`` to the original model).

Things to know:

* The model is traced in eval mode (its train/eval flags are restored afterwards), so
  train-only Python branches (layerdrop, gradient checkpointing) stay out of the graph;
  functional dropout in the traced code reads the GraphModule's ``training`` flag, and every
  layer (a leaf) keeps its own dropout - ``.train()`` / ``.eval()`` work as usual.
* Input ranks/dtypes and parameter dtypes are constants of the trace (HF code branches on
  ``pixel_values.dtype != weight.dtype``): cast the model to its final dtype before branchify,
  or use autocast.
* Penultimate features (the final Linear's input): BERT - the pooler output; DistilBERT -
  ``relu(pre_classifier(CLS))``; ViT - the normed CLS token; GPT-2 / T5 / Marian LM heads -
  the per-token hidden states ``[B, L, H]``. Pass ``feature_node=`` to change it.
* State-dict entries the traced forward never reads under their own name (T5's / Marian's
  tied ``shared`` embedding) are anchored in the graph so that branchify reports them and its
  strict export can fill them (:func:`.graph_passes.anchor_unreferenced_state`).

Examples:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import branchify as bf
    >>> bert = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=4,
    ...     num_attention_heads=4, intermediate_size=128))
    >>> bf.split_points(bert)[:5]                                   # doctest: +SKIP
    ['<input>', 'bert', 'bert.embeddings', 'bert.encoder', 'bert.encoder.layer.0']
    >>> tracer = HFTracer(input_names=["input_ids", "attention_mask"])
    >>> bm = bf.branchify(bert, bf.Spec(splits=["bert.encoder.layer.2"], fanout=[3]), tracer=tracer)
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ...surgery.tracing import Tracer
from .graph_passes import anchor_unreferenced_state, move_wrapper_constants, root_view, strip_graph
from .guards import Guard, find_guard, record_guard
from .inputs import (
    MASK_DEFAULT,
    WRAPPER_ATTR,
    HFTracerError,
    default_input_names,
    input_meta,
    make_wrapper,
    required_first,
)
from .leaves import Patches, autowrapped, coarse_leaf_paths, mask_builders, python_modules_of
from .proxy import InputProxy, is_cache, is_config, raw_tensor_attr

__all__ = ["HFTracer", "HFTracerError", "coarse_tracer_for"]


class HFTracer(Tracer):
    """Coarse fx tracer for transformers ``PreTrainedModel`` s (chosen automatically by branchify).

    Args:
        input_names: the model inputs the branched model takes, in order (default:
            :func:`.default_input_names`). The first is required; the rest default to ``None``
            (attention masks to all ones).
        leaf_modules: extra module paths (relative to the HF model, e.g.
            ``"bert.encoder.layer.3.attention"``) or classes recorded as single calls - use it
            for a custom module with data-dependent Python control flow.
        autowrap_functions: extra free functions recorded as single calls.
        coarse: also make embeddings and every layer leaves (default ``True``; with ``False``
            only ``leaf_modules`` and torch's own modules are leaves, which rarely traces).

    After :meth:`trace`, ``tracer.root`` is a view of the HF model whose paths are the graph's
    ``call_module`` / ``get_attr`` targets, and ``tracer.guards`` lists the input checks kept
    as run-time assertions.

    Examples:
        >>> tracer = HFTracer(input_names=["input_ids", "attention_mask"],
        ...                   leaf_modules=["my_model.fancy_router"])        # doctest: +SKIP
        >>> bm = branchify.branchify(model, spec, tracer=tracer)             # doctest: +SKIP
    """

    def __init__(self, input_names: Sequence[str] | None = None, leaf_modules: Iterable[str | type] = (),
                 autowrap_functions: Sequence[Callable] = (), coarse: bool = True) -> None:
        super().__init__(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
        self.input_names = list(input_names) if input_names is not None else None
        self.user_autowrap = list(autowrap_functions)
        self.coarse = coarse
        self.coarse_leaves: set[str] = set()
        self.hf_model: nn.Module | None = None
        self.guards: list[Guard] = []
        self._object_paths: dict[int, str] = {}
        self._n_constants = 0
        self._constants: dict[str, Any] = {}
        self._input_meta: dict[str, tuple[int | None, torch.dtype | None]] = {}
        self.used_input_names: list[str] = []

    # -------------------------------------------------------------- fx hooks
    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "placeholder" and str(node.target) in self._input_meta:
            rank, dtype = self._input_meta[str(node.target)]
            node.meta["branchify_rank"], node.meta["branchify_dtype"] = rank, dtype
        elif node.op == "call_function" and node.target is MASK_DEFAULT:
            node.meta["branchify_rank"], node.meta["branchify_dtype"] = 2, torch.long
        elif node.op == "get_attr":
            value = raw_tensor_attr(self.root, str(node.target))
            if value is not None:
                node.meta["branchify_rank"], node.meta["branchify_dtype"] = value.ndim, value.dtype
        return InputProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A traced condition in control flow: an input check (see :mod:`.guards`) or an error."""
        guard = find_guard()
        if guard is None:
            return super().to_bool(obj)
        self.guards.append(guard)
        return record_guard(self, obj, guard)

    @staticmethod
    def _strip(path: str) -> str:
        if path == WRAPPER_ATTR:
            return ""
        return path[len(WRAPPER_ATTR) + 1:] if path.startswith(WRAPPER_ATTR + ".") else path

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        path = self._strip(module_qualified_name)
        if module_qualified_name == WRAPPER_ATTR:
            return False
        if path in self.coarse_leaves or path in self.leaf_paths:
            return True
        return super().is_leaf_module(m, path)

    def call_module(self, m, forward, args, kwargs):  # noqa: D401 - fx hook
        if self.submodule_paths is not None and m not in self.submodule_paths:
            # A module built inside forward (``nn.ReLU()(x)``): trace through it as code.
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            if self.failed_module_path is not None:
                self.failed_module_path = self._strip(self.failed_module_path)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, (fx.Proxy, torch.Tensor, nn.Module)) or a is None:
            return super().create_arg(a)
        if is_cache(a):
            raise HFTracerError(
                f"a {type(a).__name__} (key/value cache) reached a traced operation; branchify traces "
                f"HF models with use_cache=False - if this model creates a cache anyway, mark the module "
                f"that uses it as a leaf: HFTracer(leaf_modules=[...])")
        if is_config(a) or (dataclasses.is_dataclass(a) and not isinstance(a, type)):
            return self._constant(a)
        try:
            return super().create_arg(a)
        except NotImplementedError:
            return self._constant(a)

    def _constant(self, obj: Any) -> fx.Node:
        """A ``get_attr`` node for a non-tensor object (kept as is, never rebuilt)."""
        path = self._object_paths.get(id(obj))
        if path is None:
            path = next((name for name, value in self._constants.items() if value is obj), None)
        if path is None:
            path = f"_branchify_const_{self._n_constants}"
            self._n_constants += 1
            self._constants[path] = obj
            setattr(self.root, path, obj)
        return self.create_node("get_attr", path, (), {})

    def _collect_object_paths(self, root: nn.Module) -> None:
        self._object_paths = {}
        for mname, m in root.named_modules():
            for k, v in vars(m).items():
                if is_config(v) and id(v) not in self._object_paths:
                    self._object_paths[id(v)] = f"{mname}.{k}" if mname else k

    # -------------------------------------------------------------- tracing
    def _reset(self, model: nn.Module) -> list[str]:
        self.hf_model = model
        names = required_first(self.input_names or default_input_names(model))
        self.used_input_names = list(names)
        self.coarse_leaves = set(coarse_leaf_paths(model)) if self.coarse else set()
        self.failed_module_path = None
        self._constants, self._n_constants, self.guards = {}, 0, []
        self._input_meta = input_meta(model, names)
        return names

    def trace(self, root: nn.Module | Callable, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` (a transformers model) and return a graph over ``root``'s own names."""
        if not isinstance(root, nn.Module):
            raise TypeError(f"HFTracer traces a transformers model (nn.Module), got {type(root).__name__}")
        if concrete_args:
            raise HFTracerError("HFTracer does not take concrete_args; choose the inputs with "
                                "HFTracer(input_names=[...])")
        model = root
        names = self._reset(model)
        wrapper = make_wrapper(model, names)
        self._collect_object_paths(wrapper)
        modes = {m: m.training for m in model.modules()}
        model.eval()  # train-only Python branches (layerdrop, checkpointing) stay out of the graph
        with Patches() as patches:
            for namespace, name, fn in mask_builders(model) + self._user_autowrap_sites(model):
                patches.set(namespace, name, autowrapped(fn))
            try:
                graph = super().trace(wrapper)
            except HFTracerError:
                raise
            except Exception as exc:
                raise HFTracerError(self._explain(model, exc)) from exc
            finally:
                for m, mode in modes.items():
                    m.training = mode
        view = root_view(model)
        move_wrapper_constants(graph, wrapper, view)
        graph = strip_graph(graph, self._strip)
        anchor_unreferenced_state(graph, model)
        self.root = view
        return graph

    def _user_autowrap_sites(self, model: nn.Module) -> list[tuple[dict, str, Callable]]:
        """Every global name bound to a user autowrap function in the model's Python modules."""
        if not self.user_autowrap:
            return []
        modules = python_modules_of(model) + [sys.modules[type(model).__module__]]
        modules += [sys.modules[f.__module__] for f in self.user_autowrap if f.__module__ in sys.modules]
        sites, seen = [], set()
        for module in modules:
            for name, value in list(vars(module).items()):
                if any(value is f for f in self.user_autowrap) and (id(module), name) not in seen:
                    seen.add((id(module), name))
                    sites.append((vars(module), name, value))
        return sites

    def _explain(self, model: nn.Module, exc: Exception) -> str:
        where = self.failed_module_path
        if where:
            mod = model.get_submodule(where)
            what = f"module '{where}' ({type(mod).__name__})"
            fix = (f"mark it as a leaf (recorded as one call; it then cannot be a split point's "
                   f"interior): branchify.branchify(model, spec, tracer=branchify.integrations.hf."
                   f"HFTracer(leaf_modules=['{where}'])) - or branchify.Tracer(leaf_modules=['{where}']) "
                   f"semantics, which HFTracer extends")
        else:
            what = f"the top-level forward of {type(model).__name__}"
            fix = ("mark the offending submodule as a leaf with HFTracer(leaf_modules=['<path>']) or the "
                   "offending free function with HFTracer(autowrap_functions=[fn]), or choose other inputs "
                   "with HFTracer(input_names=[...])")
        return (f"the coarse Hugging Face tracer could not trace {what}: {type(exc).__name__}: {exc}\n"
                f"  fix: {fix}")


def coarse_tracer_for(model: nn.Module) -> HFTracer:
    """The tracer branchify uses for a transformers model (``branchify`` calls this itself).

    Examples:
        >>> gm = branchify.trace(bert_classifier, coarse_tracer_for(bert_classifier))   # doctest: +SKIP
    """
    return HFTracer()
