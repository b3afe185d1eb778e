"""llmopt's C++ decode ops for the CPU (llmopt/quant/csrc/decode_cpu.cpp) against torch's own ops,
and the engine's eager CPU decode with and without them."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.quant import cpu_kernels

if not cpu_kernels.decode_ops_available():
    pytest.skip("llmopt's CPU ops need an x86-64 CPU with AVX2 and a C++ compiler", allow_module_level=True)


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (2, 100), (5, 1, 1, 72)])
def test_rms_norm_matches_torch(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    got = torch.ops.llmopt.rms_norm_cpu(x, w, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-6, atol=1e-6)


def reference_decode(q, k, v, k_cache, v_cache, slots, positions, mask, scale):
    """The engine's generic path: index_put into the cache, then SDPA with the G query heads of a KV
    head as G rows of that head."""
    b, _, heads, d = q.shape
    kv = k.shape[2]
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    length = mask.shape[-1]
    rows = slots[:, 0]
    qg = q.view(b, 1, kv, heads // kv, d).permute(0, 2, 3, 1, 4).reshape(b, kv, heads // kv, d)
    out = F.scaled_dot_product_attention(
        qg, k_cache[rows, :, :length], v_cache[rows, :, :length], attn_mask=mask, scale=scale
    )
    return out.reshape(b, 1, heads * d)


@pytest.mark.parametrize(("kv", "group", "d", "length", "window"), [
    (3, 3, 64, 256, None), (2, 4, 72, 37, None), (1, 1, 16, 5, None), (4, 2, 64, 128, 16),
])  # fmt: skip
def test_decode_attention_matches_sdpa_and_writes_the_cache(kv, group, d, length, window) -> None:
    g = torch.Generator().manual_seed(kv * 100 + d)
    b, n_slots, seq = 3, 5, length + 3
    q = torch.randn(b, 1, kv * group, d, generator=g)
    k, v = torch.randn(b, 1, kv, d, generator=g), torch.randn(b, 1, kv, d, generator=g)
    k_cache = torch.randn(n_slots, kv, seq, d, generator=g)
    v_cache = torch.randn(n_slots, kv, seq, d, generator=g)
    slots = torch.tensor([[4], [0], [2]])
    positions = torch.tensor([[length - 1], [0], [length // 2]])
    keys = torch.arange(length)
    visible = keys <= positions  # (b, L)
    if window is not None:
        visible &= keys > positions - window
    mask = torch.zeros(b, 1, group, length).masked_fill(~visible[:, None, None, :], float("-inf"))
    scale = 1 / math.sqrt(d)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = torch.ops.llmopt.decode_attention_cpu(q, k, v, kc, vc, slots, positions, mask, scale)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    want = reference_decode(q, k, v, ref_k, ref_v, slots, positions, mask, scale)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_attention_with_nothing_visible_gives_zeros_and_bad_slots_are_refused() -> None:
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 1, 16)
    caches = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 8, 16)
    mask = torch.full((1, 1, 2, 8), float("-inf"))
    out = torch.ops.llmopt.decode_attention_cpu(
        q, k, k, *caches, torch.tensor([[1]]), torch.tensor([[3]]), mask, 0.25
    )
    assert torch.equal(out, torch.zeros(1, 1, 32))
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.llmopt.decode_attention_cpu(
            q, k, k, *caches, torch.tensor([[2]]), torch.tensor([[3]]), mask, 0.25
        )


def test_engine_decode_is_the_same_with_and_without_the_cpu_ops(tiny_dir, monkeypatch) -> None:
    """Greedy decode on the engine (fp32, CPU) through llmopt's ops and through torch's: same tokens,
    logits within float rounding."""
    from llmopt.engine import Engine, EngineConfig, SamplingParams
    from llmopt.engine import model as engine_model
    from llmopt.models import LoadSpec, load_model

    def run() -> tuple[list[int], torch.Tensor]:
        lm = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu"))
        engine = Engine(lm.model, lm.tokenizer, EngineConfig(max_batch=2, max_seq=96, prefill_chunk=32))
        prompts = [[1, 5, 9, 300, 42, 7], [3, 3, 17]]
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
        step = engine.runner.decode([0, 1], torch.tensor([11, 12]), [40, 41])
        return [t for o in outs for t in o.token_ids], step.float()

    tokens_fast, logits_fast = run()
    monkeypatch.setattr(engine_model, "cpu_fast_path", lambda x: False)
    tokens_torch, logits_torch = run()
    assert tokens_fast == tokens_torch
    torch.testing.assert_close(logits_fast, logits_torch, rtol=1e-4, atol=1e-4)
