"""Retention tables, the shape every eval reports in (the paper's Tables 4-6): one row per model or
text path, a score per benchmark, the average and the retention of that average against a
reference row; written as markdown, JSON and a bar chart (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

from .._io import write_json, write_text
from ..plots import grouped_bars


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def retention_table(
    scores: dict[str, dict[str, float | None]], reference: str, lower_is_better: set[str] | frozenset = frozenset()
) -> dict:
    """A retention table (the paper's Tables 4-6): each row's average and its retention.

    Args:
        scores: row label (a text path, a checkpoint) -> {benchmark: score, or None if not scored}.
        reference: the label of the row the others are retained against (e.g. "base").
        lower_is_better: benchmarks left out of the averages (e.g. perplexity).

    Returns:
        {"columns", "lower_is_better", "reference", "rows"}: per row its scores, its average over
        the higher-is-better benchmarks and `retention` = 100 * average / the reference's average
        (None where either average is missing or the reference's is 0).

    Raises:
        KeyError: `reference` is not a row of `scores`.
    """
    columns = list(dict.fromkeys(c for row in scores.values() for c in row))
    averaged = [c for c in columns if c not in lower_is_better]
    averages = {label: _mean([row.get(c) for c in averaged]) for label, row in scores.items()}
    base = averages[reference]
    rows = {
        label: {
            "scores": {c: row.get(c) for c in columns},
            "average": averages[label],
            "retention": 100 * averages[label] / base if base and averages[label] is not None else None,
        }
        for label, row in scores.items()
    }
    return {
        "columns": columns,
        "lower_is_better": sorted(lower_is_better & set(columns)),
        "reference": reference,
        "rows": rows,
    }


def _cell(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def to_markdown(table: dict, first_column: str, percent: bool) -> str:
    """The table in markdown; with `percent`, higher-is-better scores (fractions) are shown x100."""
    lower = set(table["lower_is_better"])
    heads = [f"{c} (lower is better)" if c in lower else c for c in table["columns"]]
    lines = [
        "| " + " | ".join([first_column, *heads, "average", f"retention vs {table['reference']}"]) + " |",
        "|" + "---|" * (len(heads) + 3),
    ]
    for label, row in table["rows"].items():
        cells = [_cell(row["scores"][c], percent and c not in lower) for c in table["columns"]]
        retention = "-" if row["retention"] is None else f"{row['retention']:.1f}%"
        lines.append("| " + " | ".join([label, *cells, _cell(row["average"], percent), retention]) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path,
    stem: str,
    title: str,
    table: dict,
    details: dict,
    first_column: str,
    percent: bool,
    notes: str = "",
) -> dict[str, str]:
    """Write a retention table as `{stem}.md`, `{stem}.json` (table + details) and `{stem}.png`
    (bars per benchmark and the average, lower-is-better benchmarks left out) into `out`.

    Args:
        out: the output folder (created if needed).
        stem: the files' name, e.g. "text".
        title: the report's heading and the chart's title.
        table: what `retention_table` returns.
        details: more JSON to keep beside the table (per-item results, settings).
        first_column: the heading of the row labels' column.
        percent: scores are fractions, shown x100.
        notes: markdown added below the table.

    Returns:
        {"md", "json", "png"}: the paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("md", "json", "png")}
    markdown = to_markdown(table, first_column, percent)
    write_text(paths["md"], f"# {title}\n\n{markdown}\n{notes}".rstrip() + "\n")
    write_json(paths["json"], {"title": title, "table": table, **details})
    groups = [c for c in table["columns"] if c not in table["lower_is_better"]] + ["average"]
    scale = 100 if percent else 1
    series = {
        label: [
            scale * v if v is not None else math.nan for v in [*(row["scores"][c] for c in groups[:-1]), row["average"]]
        ]
        for label, row in table["rows"].items()
    }
    grouped_bars(groups, series, paths["png"], title, "score (%)" if percent else "score")
    return {kind: str(p) for kind, p in paths.items()}
