"""The confusion matrices of a report as one PNG: a panel per closed-set task."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any


def confusion_png(report: Mapping[str, Any]) -> bytes | None:
    """One confusion-matrix panel per closed-set task (rows: reference, columns: predicted);
    None when no closed-set task has scored items."""
    panels = [(task, rep) for task, rep in report["results"].items()
              if rep["kind"] == "closed_set" and rep["count"]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    sizes = [max(4.5, 0.5 * len(rep["labels"]) + 2.5) for _, rep in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(sizes), max(sizes)), squeeze=False)
    try:
        for ax, (task, rep) in zip(axes[0], panels):
            _draw_panel(ax, task, rep)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _draw_panel(ax, task: str, rep: Mapping[str, Any]) -> None:
    matrix, labels = rep["confusion"], rep["labels"]
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"{task}\naccuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}",
                 fontsize=10)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center",
                    color="white" if n > peak / 2 else "black")
