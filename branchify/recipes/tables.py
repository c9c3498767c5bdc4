"""The fixed-width text table the Hugging Face recipes print: titles, a dashed rule, one line a row."""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

_ALIGN_WIDTH = re.compile(r"[<>^]\d+")


def fixed_width_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> str:
    """Lay ``rows`` out under ``columns``, one space between columns, a dashed rule under the titles.

    Each column is ``(title, spec)`` where ``spec`` is a format spec that starts with its alignment
    and width (``"<10"``, ``">10.2f"``, ``">14,"``): the title is laid out with that alignment and
    width only, each cell with the whole spec (so a cell that may be a placeholder such as ``"-"``
    is passed already formatted, under a spec without a type).  The rule is as long as the title
    line; a cell wider than its column pushes the rest of its line right, as an f-string does.

    Raises:
        ValueError: a spec that does not start with an alignment and a width, or a row whose
            length is not the number of columns.

    Examples:
        >>> print(fixed_width_table([("method", "<8"), ("acc", ">6.2f"), ("params", ">7,")],
        ...                         [("one", 91.234, 12345), ("baseline", 90.5, 999)]))
        method      acc  params
        -----------------------
        one       91.23  12,345
        baseline  90.50     999
    """
    heads = []
    for title, spec in columns:
        match = _ALIGN_WIDTH.match(spec)
        if match is None:
            raise ValueError(f"column {title!r}: spec {spec!r} must start with an alignment and a width, e.g. '>10'")
        heads.append(format(title, match.group()))
    head = " ".join(heads)
    lines = [head, "-" * len(head)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row!r}")
        lines.append(" ".join(format(value, spec) for value, (_, spec) in zip(row, columns)))
    return "\n".join(lines)
