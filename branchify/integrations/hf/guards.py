"""Input checks in traced code: ``if <traced condition>: raise ...`` kept as run-time assertions.

HF forwards validate their inputs with Python control flow on traced values - Whisper's encoder
raises unless ``input_features.shape[-1] == 2 * max_source_positions``. fx cannot branch on a
traced value, so such a check would make the model untraceable. When the branch that the traced
condition selects does nothing but raise (an ``if`` whose body ends in ``raise``, the ``else`` of
one, or an ``assert``), the coarse tracer takes the branch that does not raise and records the
condition as a ``torch._assert`` node instead: the traced model still refuses the inputs the
original refuses, at run time, with a message naming the check and where it is.

Only checks whose outcome is determined by one operand are handled (``if a: raise``,
``if a or b: raise``, ``if not a: raise``, ``assert a and b``); any other control flow on a traced
value is still an error that names the module to mark as a leaf.

Examples:
    >>> gm = branchify.trace(whisper, HFTracer())                   # doctest: +SKIP
    >>> [n.target for n in gm.graph.nodes if n.target is torch._assert]   # doctest: +SKIP
    [<function _assert>]
"""
from __future__ import annotations

import ast
import functools
import inspect
import operator
import os
import textwrap
import types
from dataclasses import dataclass

import torch
import torch.fx as fx

_SKIP_DIRS = (os.path.dirname(fx.__file__), os.path.dirname(__file__))


@dataclass(frozen=True)
class Guard:
    """A check found in traced code: the value the traced condition must have, and where it is."""

    expected: bool
    source: str
    where: str

    def message(self) -> str:
        want = "true" if self.expected else "false"
        return (f"input check failed: `{self.source}` must be {want} ({self.where}); the original model "
                f"raises for these inputs too (the check was kept as a run-time assertion when tracing)")


def _user_frame() -> types.FrameType | None:
    """The first frame outside torch.fx and this package: the code that converted a proxy to bool."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back
    return frame


@functools.lru_cache(maxsize=512)
def _parsed(code: types.CodeType) -> tuple[ast.AST, int] | None:
    """``(AST, first line)`` of a function's source, or ``None`` if it is not available."""
    try:
        lines, start = inspect.getsourcelines(code)
        return ast.parse(textwrap.dedent("".join(lines))), start
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _always_raises(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[-1], ast.Raise)


def _statement_at(tree: ast.AST, line: int) -> ast.stmt | None:
    """The innermost ``if`` / ``elif`` / ``assert`` whose test spans ``line`` (relative to the tree)."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.Assert)):
            test = node.test
            if test.lineno <= line <= (test.end_lineno or test.lineno):
                if best is None or test.lineno >= best.test.lineno:
                    best = node
    return best


def _operand_value(test: ast.expr, wanted: bool) -> bool | None:
    """The truth value the converted operand must have for ``test`` to be ``wanted``, when every
    operand of ``test`` needs the same one; ``None`` when it depends on which operand it is."""
    while isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test, wanted = test.operand, not wanted
    if isinstance(test, ast.BoolOp):
        # ``a or b`` is false only if each is false; ``a and b`` true only if each is true.
        if isinstance(test.op, ast.Or) != (not wanted):
            return None
        values = {_operand_value(v, wanted) for v in test.values}
        return values.pop() if len(values) == 1 and None not in values else None
    return wanted


def find_guard() -> Guard | None:
    """The check the proxy being converted to bool belongs to, or ``None`` if it is no check.

    Called from :meth:`HFTracer.to_bool`; reads the source of the calling frame.

    Examples:
        >>> find_guard()            # outside any traced ``if``        # doctest: +SKIP
        None
    """
    frame = _user_frame()
    if frame is None:
        return None
    parsed = _parsed(frame.f_code)
    if parsed is None:
        return None
    tree, start = parsed
    stmt = _statement_at(tree, frame.f_lineno - start + 1)
    if stmt is None:
        return None
    if isinstance(stmt, ast.Assert):
        wanted = True
    elif _always_raises(stmt.body) and not _always_raises(stmt.orelse):
        wanted = False
    elif stmt.orelse and _always_raises(stmt.orelse) and not _always_raises(stmt.body):
        wanted = True
    else:
        return None
    expected = _operand_value(stmt.test, wanted)
    if expected is None:
        return None
    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    where = f"{name} in {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    return Guard(expected, ast.unparse(stmt.test), where)


def record_guard(tracer: fx.Tracer, proxy: fx.Proxy, guard: Guard) -> bool:
    """Add ``torch._assert(<condition has guard.expected's value>)`` to the graph; return that value.

    Examples:
        >>> record_guard(tracer, proxy, Guard(False, "x.shape[-1] != 32", "f in m.py:3"))   # doctest: +SKIP
        False
    """
    cond = proxy if guard.expected else tracer.create_proxy("call_function", operator.not_, (proxy,), {})
    tracer.create_proxy("call_function", torch._assert, (cond, guard.message()), {})
    return guard.expected
