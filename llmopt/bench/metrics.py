"""Pure metric math over per-request records, shared by the offline runner and the HTTP load client.

A ``RequestRecord`` is one request's timeline; everything else is computed from records alone, so
it is tested on hand-built timelines. Units live in field names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """One request, as seen by its client. Times are seconds from the request's start."""

    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None  # time to the first output token
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive output tokens
    latency_s: float | None = None  # end to end
    error: str | None = None  # a failed request is data, not a crash

    @property
    def ok(self) -> bool:
        return self.error is None and self.latency_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (latency − TTFT) / (tokens − 1)."""
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        assert self.latency_s is not None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


def distribution_ms(prefix: str, values_s: Sequence[float]) -> dict[str, float]:
    """``{prefix}_ms_mean/p50/p90/p99/min/max`` from values in seconds."""
    ms = [v * 1e3 for v in values_s]
    return {
        f"{prefix}_ms_mean": sum(ms) / len(ms) if ms else math.nan,
        f"{prefix}_ms_p50": percentile(ms, 50),
        f"{prefix}_ms_p90": percentile(ms, 90),
        f"{prefix}_ms_p99": percentile(ms, 99),
        f"{prefix}_ms_min": min(ms) if ms else math.nan,
        f"{prefix}_ms_max": max(ms) if ms else math.nan,
    }


def summarize_requests(records: Sequence[RequestRecord], wall_s: float) -> dict[str, float]:
    """Throughput and latency distributions of one run (``wall_s``: first start to last finish)."""
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "requests": float(len(records)),
        "requests_failed": float(len(records) - len(ok)),
        "output_tokens": float(output_tokens),
        "wall_s": wall_s,
        "output_tok_s": output_tokens / wall_s if wall_s > 0 else math.nan,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
    }
    summary |= distribution_ms("ttft", [r.ttft_s for r in ok if r.ttft_s is not None])
    summary |= distribution_ms("tpot", [t for r in ok if (t := r.tpot_s) is not None])
    summary |= distribution_ms("itl", [gap for r in ok for gap in r.itl_s])
    summary |= distribution_ms("e2e", [r.latency_s for r in ok if r.latency_s is not None])
    return summary


def decode_bytes_per_step(
    weight_bytes: int, embedding_bytes: int, kv_bytes_per_token: int, context_tokens: int, batch: int
) -> int:
    """Bytes one decode step must read: every weight tensor except the input embedding table (a lookup
    reads one row), at its stored width plus scales, plus each sequence's KV cache at that context."""
    return weight_bytes - embedding_bytes + kv_bytes_per_token * context_tokens * batch


def floor_ms(bytes_per_step: int, copy_bandwidth_gb_s: float) -> float:
    """The memory-bandwidth floor of one decode step, in milliseconds."""
    return bytes_per_step / (copy_bandwidth_gb_s * 1e9) * 1e3


def achieved_bandwidth_gb_s(bytes_per_step: int, step_ms: float) -> float:
    return bytes_per_step / (step_ms * 1e-3) / 1e9
