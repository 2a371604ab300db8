"""Charts a person would rather look at than read: loss curves and grouped bar charts (matplotlib,
headless Agg backend), written as PNG files."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(metrics_jsonl: str | Path, png: str | Path, title: str = "training loss") -> Path:
    """Plot loss (and learning rate) per step from a JSONL metrics log; the last entry per step wins,
    so a resumed run's repeated steps are drawn once."""
    by_step = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            by_step[row["step"]] = row
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [by_step[s]["loss"] for s in steps], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot(steps, [by_step[s]["lr"] for s in steps], color="tab:orange", alpha=0.6, label="lr")
    lr.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def grouped_bars(
    groups: list[str],
    series: dict[str, list[float]],
    png: str | Path,
    title: str,
    ylabel: str,
    reference: list[float] | None = None,
    reference_label: str = "chance",
) -> Path:
    """Bars per group for each series (e.g. accuracy per task per model), with optional reference ticks."""
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) / 2), 4.2))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    if reference is not None:
        ax.hlines(
            reference,
            [g - 0.45 for g in range(len(groups))],
            [g + 0.45 for g in range(len(groups))],
            colors="black",
            linestyles="dashed",
            label=reference_label,
        )
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)
