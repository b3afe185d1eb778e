"""Metric math on hand-built timelines."""

import math

import pytest
import torch

from llmopt.bench.metrics import (
    RequestRecord,
    achieved_bandwidth_gb_s,
    decode_bytes_per_step,
    floor_ms,
    percentile,
    summarize_requests,
)


def test_percentiles_interpolate_like_numpy():
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10.0
    assert percentile(values, 100) == 40.0
    assert percentile(values, 50) == 25.0
    assert percentile(values, 90) == pytest.approx(37.0)
    assert math.isnan(percentile([], 50))


def test_tpot_excludes_the_first_token():
    # First token at 0.5 s, then 4 more tokens 0.1 s apart: latency 0.9 s.
    record = RequestRecord(prompt_tokens=8, output_tokens=5, ttft_s=0.5, itl_s=[0.1] * 4, latency_s=0.9)
    assert record.tpot_s == pytest.approx(0.1)
    assert RequestRecord(prompt_tokens=8, output_tokens=1, ttft_s=0.5, latency_s=0.5).tpot_s is None


def test_summary_of_hand_built_timelines():
    records = [
        RequestRecord(4, 3, ttft_s=0.2, itl_s=[0.1, 0.1], latency_s=0.4),
        RequestRecord(4, 5, ttft_s=0.4, itl_s=[0.05, 0.05, 0.05, 0.05], latency_s=0.6),
        RequestRecord(4, error="HTTP 429"),
    ]
    s = summarize_requests(records, wall_s=1.0)
    assert s["requests"] == 3 and s["requests_failed"] == 1
    assert s["output_tokens"] == 8 and s["output_tok_s"] == 8.0 and s["requests_per_s"] == 2.0
    assert s["ttft_ms_p50"] == pytest.approx(300.0)
    assert s["tpot_ms_mean"] == pytest.approx(75.0)  # (100 + 50) / 2
    assert s["itl_ms_max"] == pytest.approx(100.0) and s["itl_ms_min"] == pytest.approx(50.0)
    assert s["e2e_ms_p99"] == pytest.approx(598.0)


def test_floor_formula_matches_the_llama_3_8b_table():
    # GPU.md: Llama-3-8B bf16, batch 1, ~15.0 GB per step; 3.5 ms on an H200 at 4.3 TB/s.
    weights = 16_060_522_496  # 8.03e9 parameters at 2 bytes
    embedding = 128_256 * 4096 * 2
    kv_per_token = 2 * 32 * 8 * 128 * 2
    step = decode_bytes_per_step(weights, embedding, kv_per_token, context_tokens=256, batch=1)
    assert step == weights - embedding + kv_per_token * 256
    assert step / 1e9 == pytest.approx(15.0, abs=0.1)
    assert floor_ms(step, 4300.0) == pytest.approx(3.5, abs=0.05)
    assert achieved_bandwidth_gb_s(step, floor_ms(step, 4300.0)) == pytest.approx(4300.0)
    # KV grows with context and batch.
    assert decode_bytes_per_step(100, 10, 2, 50, 4) == 100 - 10 + 2 * 50 * 4


def test_a_tied_head_counts_the_embedding_table_as_read(tiny_dir):
    from llmopt.bench.offline import model_bytes
    from llmopt.models import LoadSpec, load_model

    tied = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu")).model
    total, unread = model_bytes(tied)
    assert unread == 0  # the head is the embedding table: every step reads it whole
    tied.lm_head.weight = type(tied.lm_head.weight)(tied.lm_head.weight.detach().clone())
    untied_total, unread = model_bytes(tied)
    table = tied.model.embed_tokens.weight
    assert unread == table.numel() * 4 and untied_total == total + unread


def test_copies_kept_for_other_row_counts_are_not_read_by_a_decode_step(tiny_dir, monkeypatch):
    from llmopt.bench.offline import model_bytes
    from llmopt.models import LoadSpec, load_model
    from llmopt.quant.inplace import quantize_model_
    from llmopt.quant.linear import QuantLinear
    from llmopt.quant.schemes import QuantSpec

    model = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu")).model
    quantize_model_(model, QuantSpec("int8"))
    total, unread = model_bytes(model)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    layer.register_buffer("prefill_copy", torch.zeros(100, dtype=torch.uint8))
    monkeypatch.setattr(type(layer.kernel), "decode_unread", ("prefill_copy",))
    assert model_bytes(model) == (total + 100, unread + 100)
