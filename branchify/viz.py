"""Pictures people would rather look at: the branch tree and training curves (matplotlib).

matplotlib is optional (``pip install branchify[recipes]``); it is imported only here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .spec import INPUT, Spec
from .tree import TRUNK_KEY, TreePath


def _plt():
    import os
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")  # headless default for scripts; never override a backend already chosen (Jupyter inline)
    import matplotlib.pyplot as plt

    return plt


def tree_layout(spec: Spec) -> dict[TreePath, tuple[float, float]]:
    """x = leaf order (internal nodes centred over their leaves), y = -level."""
    leaves = spec.leaf_paths()
    pos: dict[TreePath, tuple[float, float]] = {}
    for i, p in enumerate(leaves):
        pos[p] = (float(i), -float(len(p)))
    for level in range(spec.num_levels - 1, -1, -1):
        for p in spec.level_paths(level):
            kids = [q for q in pos if len(q) == level + 1 and q[:-1] == p]
            pos[p] = (sum(pos[k][0] for k in kids) / len(kids), -float(level))
    return pos


def draw_tree(spec: Spec, ax: Any = None, title: str | None = None) -> Any:
    """Draw the tree a spec describes: trunk at the top, leaves at the bottom, target marked.

    Examples:
        >>> ax = draw_tree(Spec(splits=["layer3", "layer4"], fanout=[2, [3, 1]]))   # doctest: +SKIP
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3, spec.num_leaves * 0.9), 2 + spec.num_levels))
    pos = tree_layout(spec)
    g = spec.graph()
    for a, b in g.edges:
        ax.plot([pos[a][0], pos[b][0]], [pos[a][1], pos[b][1]], color="0.5", zorder=1)
    target = spec.leaf_paths()[spec.target]
    for p, (x, y) in pos.items():
        leaf = "leaf" in g.nodes[p]
        color = "tab:red" if p == target else ("tab:blue" if leaf else "0.3")
        ax.scatter([x], [y], s=160 if p else 260, color=color, zorder=2)
        label = (TRUNK_KEY if spec.splits[0] != INPUT else "input") if not p else (
            f"leaf {g.nodes[p]['leaf']}" if leaf else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, -16 if leaf else 10),
                    ha="center", fontsize=8)
    for lv, split in enumerate(spec.splits, start=1):
        ax.text(-0.6, -lv + 0.5, f"cut: {split}", fontsize=7, color="0.4", ha="right", va="center")
    ax.set_title(title or f"{spec.num_leaves} leaves (red = deployed)", fontsize=9)
    ax.axis("off")
    ax.margins(0.25)
    return ax


def draw_trees(specs: dict[str, Spec], path: str | Path) -> Path:
    """One panel per named spec, saved as a PNG; the figure title says that red marks the deployed leaf."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(specs), figsize=(3.2 * len(specs), 3.5), squeeze=False)
    for ax, (name, spec) in zip(axes[0], specs.items()):
        draw_tree(spec, ax, title=f"{name}: {spec.num_leaves} " + ("leaves" if spec.num_leaves != 1 else "leaf"))
    fig.suptitle("Branch trees trained by each method - red marks the deployed leaf (what export() returns)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(histories: dict[str, Sequence[Sequence[dict]]], path: str | Path,
                key: str = "target_acc", ylabel: str = "test accuracy of the deployed model (%)",
                title: str | None = None) -> Path:
    """Mean (and min-max band over seeds) of ``key`` per epoch, one line per method; with few
    evaluation points every point is marked and labelled with its value."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in histories.items():
        per_epoch: dict[int, list[float]] = {}
        for hist in runs:
            for rec in hist:
                if key in rec:
                    per_epoch.setdefault(rec["epoch"], []).append(rec[key])
        if not per_epoch:
            continue
        xs = sorted(per_epoch)
        mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in xs]
        line, = ax.plot(xs, mean, marker="o" if len(xs) < 15 else None, ms=4, label=name)
        if len(xs) <= 6:  # few points: the values themselves are what a reader wants
            ax.annotate(f"{mean[-1]:.2f}", (xs[-1], mean[-1]), textcoords="offset points", xytext=(4, 0),
                        fontsize=7, color=line.get_color(), va="center")
        if any(len(per_epoch[e]) > 1 for e in xs):
            ax.fill_between(xs, [min(per_epoch[e]) for e in xs], [max(per_epoch[e]) for e in xs],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
