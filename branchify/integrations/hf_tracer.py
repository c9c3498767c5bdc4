"""The coarse fx tracer for Hugging Face transformers models (v5 and later).

``torch.fx.symbolic_trace`` cannot trace a transformers 5.x model: the root ``forward`` takes
``**kwargs`` (fx cannot re-create its code object), embeddings slice buffers with symbolic
sizes, the mask builders branch on tensor values and attention layers unpack symbolic shapes.
:class:`HFTracer` traces at the granularity branchify needs instead:

* **Coarse leaves.** Embedding modules and every encoder / decoder layer (the classes in the
  model's ``_no_split_modules``, and the blocks of any ``ModuleList`` of identical blocks) are
  recorded as one ``call_module`` each, so split points are layer paths such as
  ``"bert.encoder.layer.4"`` or ``"model.decoder.layers.1"``.
* **Mask builders are autowrapped.** Every function from ``transformers.masking_utils`` /
  ``transformers.modeling_attn_mask_utils`` and every module-level ``*mask*`` builder that the
  model's modules use becomes one ``call_function`` node, evaluated at run time with real
  tensors (so a padding mask is still computed from the real ``attention_mask``).
* **Configs are constants.** A config (or any other non-tensor object argument; key/value
  caches are refused - the wrapper passes ``use_cache=False``) is referenced
  through a ``get_attr`` node - at its existing path (``bert.config``) when it has one - and is
  never rebuilt. fx would otherwise re-create a dataclass config from its public fields, which
  drops private ones such as ``_attn_implementation`` and silently disables padding masks.
* **Explicit inputs.** The root is traced through a wrapper whose ``forward`` takes the model's
  inputs by name (``input_ids, attention_mask, ...``; see :func:`default_input_names`) and
  calls the model with ``return_dict=False`` (and ``use_cache=False``), returning the logits.
  The wrapper's prefix is removed afterwards, so qualified names in the graph equal the
  original ``state_dict`` keys and ``tracer.root`` is the Hugging Face model itself.

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
  the per-token hidden states ``[B, L, H]``. GPT-2 *sequence classification* scores every
  token and then picks the last real one, so its features are per token too (aggregators
  that pool features average over all positions); pass ``feature_node=`` to change it.
* State-dict entries the traced forward never reads under their own name (T5's / Marian's
  tied ``shared`` embedding) are anchored in the graph so that branchify reports them and its
  strict export can fill them (see :func:`_anchor_unreferenced_state`).

Example:
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
import inspect
import sys
import types
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from branchify.surgery.tracing import Tracer, TraceError

WRAPPER_ATTR = "hf_model"
"""Name of the traced HF model inside the tracing wrapper (stripped from the final graph)."""

_MASK_MODULES = ("transformers.masking_utils", "transformers.modeling_attn_mask_utils")
_INPUT_RANKS = {"input_ids": 2, "attention_mask": 2, "token_type_ids": 2, "position_ids": 2,
                "decoder_input_ids": 2, "decoder_attention_mask": 2, "pixel_values": 4,
                "input_features": 3, "input_values": 2, "inputs_embeds": 3}


def _mask_default(mask: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` or, when it was left out, an all-ones mask shaped like ``like`` (no padding)."""
    if mask is None and like is not None:
        return torch.ones(like.shape[:2], dtype=torch.long, device=like.device)
    return mask


fx.wrap("_mask_default")
_MASK_DEFAULT = _mask_default  # the name is patched while tracing; keep the function itself


class HFTracerError(TraceError):
    """The coarse HF tracer could not trace a model; the message names the module and the fix."""


# ---------------------------------------------------------------------- inputs
def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """Named parameters of ``model.forward`` (``**kwargs`` / ``*args`` left out)."""
    sig = inspect.signature(type(model).forward)
    return {n: p for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def default_input_names(model: nn.Module) -> list[str]:
    """The inputs a branched HF model takes by default, in this order.

    ``model.main_input_name`` (``input_ids``, ``pixel_values``...), then for token inputs
    ``attention_mask``, ``token_type_ids`` (only when the config has ``type_vocab_size > 1``,
    as BERT does), and for encoder-decoder models ``decoder_input_ids`` and
    ``decoder_attention_mask``. Pass ``HFTracer(input_names=[...])`` for another set. Required
    inputs (the main one and ``decoder_input_ids``) come first.

    Example:
        >>> default_input_names(bert_classifier)                   # doctest: +SKIP
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    params = forward_parameters(model)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    names = [main]
    if main == "input_ids":
        if "attention_mask" in params:
            names.append("attention_mask")
        if "token_type_ids" in params and (getattr(config, "type_vocab_size", 0) or 0) > 1:
            names.append("token_type_ids")
    if getattr(config, "is_encoder_decoder", False):
        names += [n for n in ("decoder_input_ids", "decoder_attention_mask") if n in params]
    return _required_first(names)


_REQUIRED_SECOND = ("decoder_input_ids",)


def _required_first(names: Sequence[str]) -> list[str]:
    """The main input, then ``decoder_input_ids`` (both required), then the optional inputs."""
    names = list(names)
    required = [names[0]] + [n for n in names[1:] if n in _REQUIRED_SECOND]
    return required + [n for n in names if n not in required]


def _make_wrapper(model: nn.Module, input_names: Sequence[str]) -> nn.Module:
    """A module whose ``forward(<input_names>)`` calls ``model`` by keyword and returns the logits."""
    params = forward_parameters(model)
    accepts_kwargs = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(type(model).forward).parameters.values())
    unknown = [n for n in input_names if n not in params and not accepts_kwargs]
    if unknown:
        raise HFTracerError(f"{type(model).__name__}.forward takes no input(s) {unknown}; its inputs are "
                            f"{list(params)}")
    for n in input_names:
        if not n.isidentifier():
            raise HFTracerError(f"input name {n!r} is not a Python identifier")
    input_names = _required_first(input_names)
    main = input_names[0]
    sig_parts, body = [], []
    for n in input_names:
        sig_parts.append(n if n == main or n in _REQUIRED_SECOND else f"{n}=None")
        if n.endswith("attention_mask"):
            ref = "decoder_input_ids" if n.startswith("decoder_") and "decoder_input_ids" in input_names else main
            if _INPUT_RANKS.get(ref) == 2:
                body.append(f"    {n} = _mask_default({n}, {ref})")
    call = ", ".join(f"{n}={n}" for n in input_names)
    extra = ["return_dict=False"]
    if "use_cache" in params:
        extra.append("use_cache=False")
    src = (f"def forward(self, {', '.join(sig_parts)}):\n" + "\n".join(body) + ("\n" if body else "")
           + f"    out = self.{WRAPPER_ATTR}({call}, {', '.join(extra)})\n"
           + "    return out[0] if isinstance(out, (tuple, list)) else out\n")
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<branchify HF wrapper of {type(model).__name__}>", "exec"), globals(), namespace)
    cls = type(f"{type(model).__name__}Inputs", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    setattr(wrapper, WRAPPER_ATTR, model)
    return wrapper


def _input_meta(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int | None, torch.dtype | None]]:
    """Rank and dtype the traced code may assume for each input (ids/masks: long, else floats)."""
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    meta = {}
    for n in names:
        integer = n.endswith(("input_ids", "attention_mask", "token_type_ids", "position_ids"))
        meta[n] = (_INPUT_RANKS.get(n), torch.long if integer else float_dtype)
    return meta


# ---------------------------------------------------------------------- leaves and autowrap
def coarse_leaf_paths(model: nn.Module) -> list[str]:
    """Module paths the coarse tracer records as single calls (embeddings and layers).

    A module is a leaf when its class is in ``model._no_split_modules`` (what transformers
    itself never splits across devices: the layers, sometimes the embeddings), when its class
    name contains ``Embedding`` (token / position / patch embeddings) or when it is one block
    of a ``ModuleList`` of identical blocks (the encoder / decoder layers). Leaves nested
    inside another leaf are not listed.

    Example:
        >>> coarse_leaf_paths(bert_classifier)[:3]                 # doctest: +SKIP
        ['bert.embeddings', 'bert.encoder.layer.0', 'bert.encoder.layer.1']
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    leaves: list[str] = []

    def is_block_list(m: nn.Module) -> bool:
        kids = list(m.children())
        return (isinstance(m, nn.ModuleList) and len(kids) > 0 and len({type(k) for k in kids}) == 1
                and not type(kids[0]).__module__.startswith("torch.nn")
                and any(True for _ in kids[0].parameters()))

    def walk(m: nn.Module, prefix: str, in_block_list: bool) -> None:
        for name, child in m.named_children():
            path = f"{prefix}{name}"
            cls = type(child)
            hf_class = cls.__module__.startswith("transformers.")
            if (cls.__name__ in no_split or in_block_list
                    or (hf_class and "Embedding" in cls.__name__)):
                leaves.append(path)
                continue
            walk(child, path + ".", is_block_list(child))

    walk(model, "", False)
    return leaves


def _python_modules_of(model: nn.Module) -> list[types.ModuleType]:
    """The transformers Python modules that define the model's (sub)module classes."""
    seen: dict[str, types.ModuleType] = {}
    for m in model.modules():
        for cls in type(m).__mro__:
            mod = cls.__module__
            if mod.startswith("transformers.") and mod not in seen and mod in sys.modules:
                seen[mod] = sys.modules[mod]
    return list(seen.values())


def _is_mask_builder(name: str, fn: Any, module: types.ModuleType) -> bool:
    if not isinstance(fn, types.FunctionType):
        return False
    if fn.__module__ in _MASK_MODULES:
        return True
    # Module-level mask builders of the model's own file (older models: _prepare_4d_*_mask...).
    return fn.__module__ == module.__name__ and "mask" in name.lower() and (
        name.lstrip("_").startswith(("create", "prepare", "make", "expand", "get", "update", "build")))


def mask_builders(model: nn.Module) -> list[tuple[dict, str, Callable]]:
    """``(globals, name, function)`` for every mask builder the model's modules can call.

    Example:
        >>> sorted({name for _, name, _ in mask_builders(bert_classifier)})   # doctest: +SKIP
        ['create_bidirectional_mask', 'create_causal_mask']
    """
    found = []
    for module in _python_modules_of(model):
        if module.__name__ in _MASK_MODULES:
            continue
        for name, fn in list(vars(module).items()):
            if _is_mask_builder(name, fn, module):
                found.append((vars(module), name, fn))
    return found


def _autowrapped(fn: Callable) -> Callable:
    """``fn`` recorded as one ``call_function`` node when called with proxies (like ``fx.wrap``)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = None

        def find(a: Any) -> Any:
            nonlocal proxy
            if isinstance(a, fx.Proxy):
                proxy = a
            return a

        fx.node.map_aggregate(args, find)
        fx.node.map_aggregate(kwargs, find)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    wrapper.__wrapped_by_branchify__ = fn  # type: ignore[attr-defined]
    return wrapper


class _Patches:
    """Temporarily replaced globals, restored on exit."""

    def __init__(self) -> None:
        self._saved: list[tuple[dict, str, Any]] = []

    def set(self, namespace: dict, name: str, value: Any) -> None:
        self._saved.append((namespace, name, namespace[name]))
        namespace[name] = value

    def __enter__(self) -> "_Patches":
        return self

    def __exit__(self, *exc: Any) -> None:
        for namespace, name, value in reversed(self._saved):
            namespace[name] = value
        self._saved.clear()


# ---------------------------------------------------------------------- the tracer
class _InputProxy(fx.Proxy):
    """A proxy that knows the rank and dtype of model inputs and of parameters / buffers.

    HF forwards branch on them (``attention_mask.ndim < 4``, ``pixel_values.dtype !=
    weight.dtype``). For the model's inputs the answer is fixed before tracing and for
    parameters it is read from the tensor, so it is returned as a constant instead of failing
    as symbolic control flow (trace after choosing the model's dtype). Every other value keeps
    fx's symbolic behaviour.
    """

    def _known(self, key: str) -> Any:
        return self.node.meta.get(key)

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        rank = self._known("branchify_rank")
        return rank if rank is not None else fx.proxy.Attribute(self, "ndim")

    @property
    def dtype(self) -> Any:  # type: ignore[override]
        dtype = self._known("branchify_dtype")
        return dtype if dtype is not None else fx.proxy.Attribute(self, "dtype")

    def dim(self) -> Any:
        rank = self._known("branchify_rank")
        return rank if rank is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def is_floating_point(self) -> Any:
        dtype = self._known("branchify_dtype")
        if dtype is not None:
            return dtype.is_floating_point
        return self.tracer.create_proxy("call_method", "is_floating_point", (self,), {})


def _raw_tensor_attr(root: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter / buffer at ``path``, read without ``nn.Module.__getattr__`` (patched by fx)."""
    *owners, name = path.split(".")
    m = root
    for part in owners:
        m = vars(m).get("_modules", {}).get(part)
        if m is None:
            return None
    d = vars(m)
    value = d.get("_parameters", {}).get(name)
    if value is None:
        value = d.get("_buffers", {}).get(name)
    return value if isinstance(value, torch.Tensor) else None


def _is_config(obj: Any) -> bool:
    return any(c.__name__ in ("PreTrainedConfig", "PretrainedConfig") for c in type(obj).__mro__)


def _is_cache(obj: Any) -> bool:
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(obj).__mro__)


class HFTracer(Tracer):
    """Coarse fx tracer for transformers ``PreTrainedModel`` s (chosen automatically by branchify).

    Args:
        input_names: the model inputs the branched model takes, in order (default:
            :func:`default_input_names`). The first is required; the rest default to ``None``
            (attention masks to all ones).
        leaf_modules: extra module paths (relative to the HF model, e.g.
            ``"bert.encoder.layer.3.attention"``) or classes recorded as single calls - use it
            for a custom module with data-dependent Python control flow.
        autowrap_functions: extra free functions recorded as single calls.
        coarse: also make embeddings and every layer leaves (default ``True``; with ``False``
            only ``leaf_modules`` and torch's own modules are leaves, which rarely traces).

    After :meth:`trace`, ``tracer.root`` is the HF model and the graph's ``call_module`` /
    ``get_attr`` targets are paths in it.

    Example:
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
        elif node.op == "call_function" and node.target is _MASK_DEFAULT:
            node.meta["branchify_rank"], node.meta["branchify_dtype"] = 2, torch.long
        elif node.op == "get_attr":
            value = _raw_tensor_attr(self.root, str(node.target))
            if value is not None:
                node.meta["branchify_rank"], node.meta["branchify_dtype"] = value.ndim, value.dtype
        return _InputProxy(node, self)

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
        if _is_cache(a):
            raise HFTracerError(
                f"a {type(a).__name__} (key/value cache) reached a traced operation; branchify traces "
                f"HF models with use_cache=False - if this model creates a cache anyway, mark the module "
                f"that uses it as a leaf: HFTracer(leaf_modules=[...])")
        if _is_config(a) or (dataclasses.is_dataclass(a) and not isinstance(a, type)):
            return self._constant(a)
        try:
            return super().create_arg(a)
        except NotImplementedError:
            return self._constant(a)

    def _constant(self, obj: Any) -> fx.Node:
        """A ``get_attr`` node for a non-tensor object (kept as is, never rebuilt)."""
        path = self._object_paths.get(id(obj))
        if path is None:
            for name, value in self._constants.items():
                if value is obj:
                    path = name
                    break
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
                if _is_config(v) and id(v) not in self._object_paths:
                    self._object_paths[id(v)] = f"{mname}.{k}" if mname else k

    # -------------------------------------------------------------- tracing
    def trace(self, root: nn.Module | Callable, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` (a transformers model) and return a graph over ``root``'s own names."""
        if not isinstance(root, nn.Module):
            raise TypeError(f"HFTracer traces a transformers model (nn.Module), got {type(root).__name__}")
        if concrete_args:
            raise HFTracerError("HFTracer does not take concrete_args; choose the inputs with "
                                "HFTracer(input_names=[...])")
        model = root
        self.hf_model = model
        names = _required_first(self.input_names or default_input_names(model))
        self.used_input_names = list(names)
        self.coarse_leaves = set(coarse_leaf_paths(model)) if self.coarse else set()
        self.failed_module_path = None
        self._constants = {}
        self._n_constants = 0
        wrapper = _make_wrapper(model, names)
        self._input_meta = _input_meta(model, names)
        self._collect_object_paths(wrapper)
        modes = {m: m.training for m in model.modules()}
        model.eval()  # train-only Python branches (layerdrop, checkpointing) stay out of the graph
        with _Patches() as patches:
            for namespace, name, fn in mask_builders(model):
                patches.set(namespace, name, _autowrapped(fn))
            for namespace, name, fn in self._user_autowrap_sites(model):
                patches.set(namespace, name, _autowrapped(fn))
            try:
                graph = super().trace(wrapper)
            except HFTracerError:
                raise
            except Exception as exc:
                raise HFTracerError(self._explain(model, exc)) from exc
            finally:
                for m, mode in modes.items():
                    m.training = mode
        for name, value in self._constants.items():
            setattr(model, name, value)
            try:
                delattr(wrapper, name)
            except AttributeError:
                pass
        graph = self._strip_graph(graph, names)
        _anchor_unreferenced_state(graph, model)
        self.root = model
        return graph

    def _user_autowrap_sites(self, model: nn.Module) -> list[tuple[dict, str, Callable]]:
        """Every global name bound to a user autowrap function in the model's Python modules."""
        if not self.user_autowrap:
            return []
        modules = _python_modules_of(model) + [sys.modules[type(model).__module__]]
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
                   f"interior): branchify.branchify(model, spec, tracer=branchify.integrations.hf_tracer."
                   f"HFTracer(leaf_modules=['{where}'])) - or branchify.Tracer(leaf_modules=['{where}']) "
                   f"semantics, which HFTracer extends")
        else:
            what = f"the top-level forward of {type(model).__name__}"
            fix = ("mark the offending submodule as a leaf with HFTracer(leaf_modules=['<path>']) or the "
                   "offending free function with HFTracer(autowrap_functions=[fn]), or choose other inputs "
                   "with HFTracer(input_names=[...])")
        return (f"the coarse Hugging Face tracer could not trace {what}: {type(exc).__name__}: {exc}\n"
                f"  fix: {fix}")

    def _strip_graph(self, graph: fx.Graph, names: Sequence[str]) -> fx.Graph:
        """Copy ``graph`` with the wrapper prefix removed from targets, stacks and node names."""
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        prefix = WRAPPER_ATTR + "_"
        for n in graph.nodes:
            target = n.target
            if n.op in ("call_module", "get_attr"):
                target = self._strip(str(target))
            args = fx.node.map_arg(n.args, lambda x: env[x])
            kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
            name = n.name[len(prefix):] if n.name.startswith(prefix) else n.name
            m = new.create_node(n.op, target, args, kwargs, name=name, type_expr=n.type)
            meta = dict(n.meta)
            stack = meta.get("nn_module_stack")
            if stack:
                meta["nn_module_stack"] = type(stack)(
                    (self._strip(k), (self._strip(v[0]), v[1])) for k, v in stack.items()
                    if v[0] != WRAPPER_ATTR)
            m.meta = meta
            env[n] = m
        _dynamic_dropout(new)
        _drop_dead_nodes(new)
        return new


_DROPOUT_FUNCS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2, F.alpha_dropout: 2,
                  F.feature_alpha_dropout: 2}
"""Functional dropouts and the position of their ``training`` argument."""


def _dynamic_dropout(graph: fx.Graph) -> int:
    """Make functional dropout follow ``module.train()`` / ``.eval()`` instead of the traced mode.

    ``F.dropout(x, p, training=self.training)`` is recorded with the Python bool of the
    moment; it is replaced by a read of the GraphModule's own ``training`` flag.
    """
    changed = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in _DROPOUT_FUNCS:
            continue
        pos = _DROPOUT_FUNCS[n.target]
        with graph.inserting_before(n):
            flag = graph.get_attr("training")
        if "training" in n.kwargs or len(n.args) <= pos:
            n.kwargs = {**n.kwargs, "training": flag}
        else:
            n.args = (*n.args[:pos], flag, *n.args[pos + 1:])
        changed += 1
    return changed


def _anchor_unreferenced_state(graph: fx.Graph, model: nn.Module) -> int:
    """Add an (unused) ``get_attr`` for every state_dict entry the graph never references.

    Tied weights that no traced operation reads under their own name (T5's and Marian's
    ``shared`` embedding, which runs as ``encoder.embed_tokens``) and modules the forward
    never calls would otherwise be missing from the traced GraphModule, so branchify could
    not report them as "never executed" and ``export()``'s strict load would fail. Anchored,
    they are filled from the original model at export (:meth:`BranchedHFModel.export_pretrained`
    fills tied ones from their trained partner instead).
    """
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    prefixes = tuple(t + "." for t in targets)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    added = 0
    for key in model.state_dict(keep_vars=True):
        if key in targets or key.startswith(prefixes):
            continue
        if anchor is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                anchor = graph.get_attr(key)
        else:
            with graph.inserting_after(anchor):
                anchor = graph.get_attr(key)
        added += 1
    return added


def _drop_dead_nodes(graph: fx.Graph) -> None:
    """Remove unused pure nodes (shape queries, unused attribute reads) left by tracing."""
    for n in reversed(list(graph.nodes)):
        if n.users or n.op not in ("call_function", "call_method", "get_attr"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            continue  # in-place: keep its side effect
        graph.erase_node(n)


def coarse_tracer_for(model: nn.Module) -> HFTracer:
    """The tracer branchify uses for a transformers model (``branchify`` calls this itself).

    Example:
        >>> gm = branchify.trace(bert_classifier, coarse_tracer_for(bert_classifier))   # doctest: +SKIP
    """
    return HFTracer()
