"""Turn a bench result into rows (Metric | Before | After | Change), Markdown, and a PNG.

The rows are computed once here; the CLI's rich table and ``--markdown`` both print them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str]

# (summary key, label, format, whether lower is better)
BATCH_METRICS: list[tuple[str, str, str, bool]] = [
    ("ttft_ms_p50", "TTFT p50 (ms)", "{:.1f}", True),
    ("tpot_ms_p50", "TPOT p50 (ms/token)", "{:.2f}", True),
    ("e2e_ms_p50", "End-to-end p50 (ms)", "{:.0f}", True),
    ("output_tok_s", "Output tokens/s", "{:.1f}", False),
    ("requests_per_s", "Requests/s", "{:.2f}", False),
    ("peak_mem_gib", "Peak memory (GiB)", "{:.3f}", True),
    ("achieved_gb_s", "Achieved bandwidth (GB/s)", "{:.3g}", False),
    ("floor_pct", "Decode vs floor (%)", "{:.1f}", False),
]


def _change(before: float, after: float, lower_is_better: bool) -> str:
    if not before or math.isnan(before) or math.isnan(after):
        return "–"
    if lower_is_better:
        return f"{100 * (after / before - 1):+.1f}%"
    return f"{after / before:.2f}x"


def comparison_rows(doc: dict[str, Any]) -> list[Row]:
    """Rows for a compare document (``BenchResult.to_dict()`` with two candidates)."""
    before, after = doc["candidates"]
    rows: list[Row] = [
        ("Model", before["label"], after["label"], ""),
        (
            "Engine · dtype",
            f"{before['engine']} · {before['dtype']}",
            f"{after['engine']} · {after['dtype']}",
            "",
        ),
    ]
    for b, a in zip(before["batches"], after["batches"], strict=True):
        batch = b["batch_size"]
        for key, label, fmt, lower in BATCH_METRICS:
            vb, va = b["summary"][key], a["summary"][key]
            rows.append((f"batch {batch}: {label}", fmt.format(vb), fmt.format(va), _change(vb, va, lower)))
    quality = doc.get("quality")
    if quality:
        rows.append(
            (
                "Perplexity",
                f"{quality['reference_perplexity']:.3f}",
                f"{quality['perplexity']:.3f}",
                f"{quality['perplexity_increase_pct']:+.2f}%",
            )
        )
        rows.append(("Top-1 agreement with before", "100%", f"{100 * quality['top1_agreement']:.2f}%", ""))
    rows.append(
        (
            "Weights in memory (MB)",
            f"{before['weight_bytes'] / 1e6:.1f}",
            f"{after['weight_bytes'] / 1e6:.1f}",
            _change(before["weight_bytes"], after["weight_bytes"], True),
        )
    )
    rows.extend(time_rows(doc))
    return rows


def time_rows(doc: dict[str, Any]) -> list[Row]:
    """Where the time went, for the first batch size: load, warm-up, prefill, decode."""
    before, after = doc["candidates"]
    gen = doc["spec"]["gen_len"]

    def split(c: dict[str, Any]) -> list[float]:
        s = c["batches"][0]["summary"]
        return [
            c["load_s"],
            c["batches"][0]["warmup_s"],
            s["ttft_ms_p50"] / 1e3,
            s["tpot_ms_p50"] * (gen - 1) / 1e3,
        ]

    labels = ["load (s)", "warm-up, excluded (s)", "prefill = TTFT (s)", f"decode, {gen - 1} steps (s)"]
    first = before["batches"][0]["batch_size"]
    return [
        (f"time, batch {first}: {label}", f"{vb:.2f}", f"{va:.2f}", _change(vb, va, True))
        for label, vb, va in zip(labels, split(before), split(after), strict=True)
    ]


def single_header(doc: dict[str, Any]) -> tuple[str, ...]:
    (cand,) = doc["candidates"]
    return ("Metric", *(f"batch {b['batch_size']}" for b in cand["batches"]))


def single_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows for one candidate: one line per metric, one column per batch size."""
    (cand,) = doc["candidates"]
    batches = cand["batches"]
    rows = [
        (label, *(fmt.format(b["summary"][key]) for b in batches)) for key, label, fmt, _ in BATCH_METRICS
    ]
    rows.append(("Floor (ms/step)", *(f"{b['summary']['floor_ms']:.3g}" for b in batches)))
    rows.append(("Warm-up, excluded (s)", *(f"{b['warmup_s']:.2f}" for b in batches)))
    return rows


def to_markdown(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_plot(doc: dict[str, Any], path: Path) -> None:
    """Before/after bar charts per batch size: tokens/s, TPOT, TTFT, peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = doc["candidates"]
    panels = [
        ("output_tok_s", "Output tokens/s"),
        ("tpot_ms_p50", "TPOT p50 (ms)"),
        ("ttft_ms_p50", "TTFT p50 (ms)"),
        ("peak_mem_gib", "Peak memory (GiB)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    batches = [b["batch_size"] for b in candidates[0]["batches"]]
    width = 0.8 / len(candidates)
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, cand in enumerate(candidates):
            values = [b["summary"][key] for b in cand["batches"]]
            xs = [j + i * width for j in range(len(batches))]
            ax.bar(xs, values, width, label=cand["label"])
        ax.set_xticks([j + width * (len(candidates) - 1) / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_title(title)
    axes.flat[0].legend(fontsize=8)
    env = doc["environment"]
    fig.suptitle(f"llmopt bench on {env['device_name']} ({env['device']}), torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
