"""The one base class of every exception branchify defines.

Each project error also keeps the builtin it has always derived from - ``ValueError`` for input
that cannot work (a bad spec, option or configuration), ``RuntimeError`` for a failure while
running (tracing, a failed rank) - so ``except ValueError`` and ``except RuntimeError`` keep
catching what they caught, while ``except branchify.BranchifyError`` catches every error the
toolkit raises on purpose. This module imports nothing, so every module can use it.
"""
from __future__ import annotations

__all__ = ["BranchifyError"]


class BranchifyError(Exception):
    """Base of every exception branchify defines (``SpecError``, ``MethodError``, ``TraceError``, ...).

    Examples:
        >>> import branchify as bf
        >>> try:
        ...     bf.Spec(splits=["layer4"], fanout=[0])
        ... except bf.BranchifyError as exc:
        ...     print(type(exc).__name__, isinstance(exc, ValueError))
        SpecError True
    """
