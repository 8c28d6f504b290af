"""Writing evaluation results: JSON without the curves, markdown tables, PR plots (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_json", "markdown_table", "plot_pr"]


def write_json(report: dict, path: Path) -> Path:
    """``report`` as indented JSON, leaving out every ``"curves"`` entry (arrays go in plots)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "curves"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strip(report), indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats as written by the caller (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_pr(runs: dict[str, dict[str, dict]], path: Path, title: str) -> Path:
    """Precision-recall plots, one panel per setting, a curve per run label. ``runs`` maps a
    label to ``{setting: {"ap": percent, "precision": [T], "recall": [T]}}`` (the curves of
    :func:`tools.evaluation.wider_protocol.average_precision`). Runs pair up by colour: the first of each pair
    solid and thick, the second dashed and thin on top; earlier pairs lie above later ones, so
    identical curves stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for index, (label, curves) in enumerate(runs.items()):
            c = curves[setting]
            seen = c["recall"] > 0  # thresholds no prediction passes have no precision
            ax.plot(c["recall"][seen], c["precision"][seen], "--" if index % 2 else "-",
                    color=f"C{index // 2}", lw=1.2 if index % 2 else 3.0,
                    zorder=2 * (len(runs) - index // 2) + index % 2,
                    label=f"{label} (AP {c['ap']:.2f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=setting)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
