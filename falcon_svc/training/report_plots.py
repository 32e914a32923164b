"""The evaluation report's plots: confusion matrices and the reliability diagram (PNG).

matplotlib is in the dev venv (requirements-plots.txt) but not on serving hosts, so it
is imported only when drawing: without it, write_plots raises ImportError and the
report records PLOTS_SKIPPED instead (falcon_svc/training/report.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from falcon_svc.model.artifact import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
PLOT_FILES = (CONFUSION_PNG, RELIABILITY_PNG)
PLOTS_SKIPPED = "skipped: matplotlib is not installed (pip install -r requirements-plots.txt)"
# NOTE: matplotlib's object API (Figure, no pyplot): no global backend state, and
# savefig(format="png") renders with the Agg canvas, so no display is needed.
PLOT_DPI = 100


def write_plots(output_dir: Path, report: Mapping[str, Any]) -> dict[str, str]:
    """Draw the confusion matrices and the reliability diagram; raise ImportError without matplotlib."""
    # NOTE: the package first, so a missing (or blocked) matplotlib fails here even when
    # matplotlib.figure is already imported.
    import matplotlib  # noqa: F401
    from matplotlib.figure import Figure

    sets = report["sets"]
    _save(_confusion_figure(Figure, sets, report["version"]), output_dir / CONFUSION_PNG)
    _save(_reliability_figure(Figure, sets, report["version"]), output_dir / RELIABILITY_PNG)
    return {"confusion_matrix": CONFUSION_PNG, "reliability": RELIABILITY_PNG}


def _save(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=PLOT_DPI, format="png"))


def _confusion_figure(figure_class: type[Figure], sets: Mapping[str, Any], version: str) -> Figure:
    """One panel per set: counts, shaded by the share of the row (the true label)."""
    figure = figure_class(figsize=(4.2 * len(sets), 4.4), layout="constrained")
    figure.suptitle(f"confusion matrices, model {version} (rows: truth, columns: predicted)")
    axes = figure.subplots(1, len(sets), squeeze=False)[0]
    for ax, (name, section) in zip(axes, sets.items(), strict=True):
        matrix = np.array(section["confusion_matrix"], dtype=float)
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        labels = section["labels"]
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_title(f"{name} (n={section['n']}, accuracy {section['accuracy']:.3f})", fontsize=10)
        for row in range(len(labels)):
            for column in range(len(labels)):
                colour = "white" if shares[row, column] > 0.6 else "black"
                ax.text(column, row, f"{int(matrix[row, column])}", ha="center", va="center", color=colour)
    return figure


def _reliability_figure(figure_class: type[Figure], sets: Mapping[str, Any], version: str) -> Figure:
    """Accuracy against mean confidence per bin (one line per set, the diagonal is perfect), and the bin counts.

    The counts panel is there because a bin of 3 texts can sit far from the diagonal by chance.
    """
    figure = figure_class(figsize=(6.4, 7.2), layout="constrained")
    reliability, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    reliability.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    width = 0.8 / (10 * max(len(sets), 1))
    for index, (name, section) in enumerate(sets.items()):
        bins = section["calibration"]["bins"]
        filled = [bin_ for bin_ in bins if bin_["count"]]
        ece = section["calibration"]["ece"]
        line = reliability.plot(
            [bin_["confidence"] for bin_ in filled],
            [bin_["accuracy"] for bin_ in filled],
            marker="o",
            label=f"{name} (ECE {ece:.3f})" if ece is not None else name,
        )[0]
        counts.bar(
            [bin_["lower"] + 0.01 + (index + 0.5) * width for bin_ in bins],
            [bin_["count"] for bin_ in bins],
            width=width,
            color=line.get_color(),
        )
    reliability.set_xlim(0, 1)
    reliability.set_ylim(0, 1)
    reliability.set_ylabel("accuracy in the bin")
    reliability.set_title(f"reliability, model {version} (10 equal-width bins)")
    reliability.legend(loc="upper left")
    counts.set_yscale("symlog")
    counts.set_ylabel("texts per bin")
    counts.set_xlabel("mean top-class probability in the bin")
    return figure
