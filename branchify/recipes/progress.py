"""The recipes' progress bar: a tqdm bar with an ETA, or an object that ignores every call when
progress is off (so a loop updates its bar without asking whether there is one).

Examples:
    >>> bar = progress_bar(100, "one/seed0", False)
    >>> bar.update(1); bar.set_postfix(acc="91.0"); bar.close()
"""
from __future__ import annotations

from typing import Any


class NoBar:
    """A progress bar that shows nothing (``update``, ``set_postfix`` and ``close`` do nothing).

    Examples:
        >>> NoBar().update(5)
    """

    def update(self, n: int) -> None:
        """Ignore ``n`` finished steps."""

    def set_postfix(self, **kw: Any) -> None:
        """Ignore the values to show."""

    def close(self) -> None:
        """Nothing to close."""


def progress_bar(total: int, desc: str, progress: Any = True, *, leave: bool = True,
                 mininterval: float = 1.0) -> Any:
    """A tqdm bar over ``total`` steps labelled ``desc``, or a :class:`NoBar` when ``progress`` is
    ``False`` or ``None``.

    ``progress``: ``True`` (a bar), or an int: the bar on that terminal line (for runs in parallel
    processes, one line each). ``leave`` keeps the finished bar on screen; ``mininterval`` is the
    least number of seconds between redraws.

    Examples:
        >>> type(progress_bar(10, "x", False)).__name__
        'NoBar'
    """
    if progress is False or progress is None:
        return NoBar()
    from tqdm.auto import tqdm

    position = None if progress is True else int(progress)
    return tqdm(total=total, desc=desc, position=position, leave=leave, dynamic_ncols=True, mininterval=mininterval)
