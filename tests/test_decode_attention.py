"""llmopt's fused decode attention (llmopt/engine/triton_attention.py), under Triton's interpreter.

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors with the same
index arithmetic, chunking, masks and combine as on the GPU (examples/gpu_attention_bench.py runs
the same check in bf16 on the card).

Reference: float64 softmax attention over the cache as it must be after the call (the new k/v
written at each row's position). Before the call, every cache position a row may not see (its
future, before its window, at or past attn_len) and its own position are NaN, and torch.empty
fills with NaN (deterministic mode), so a read the kernel must not make, or an output or partial
it never writes, shows up as NaN. With fp32 inputs the only error is fp32 accumulation:
relative Frobenius error <= 1e-5.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these run under Triton's interpreter (a GPU machine checks the compiled kernel)",
                allow_module_level=True)  # fmt: skip

from llmopt.engine import model as engine_model  # noqa: E402
from llmopt.engine import triton_attention as ta  # noqa: E402

REL_TOL = 1e-5


@pytest.fixture
def nan_filled_empty() -> Iterator[None]:
    """torch.empty returns NaN-filled memory in deterministic mode: unwritten outputs show up."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@dataclass(frozen=True)
class Case:
    positions: tuple[int | None, ...]  # one per row; None: the cache's scratch position (an idle row)
    n_heads: int
    n_kv: int
    head_dim: int
    attn_len: int
    extra: int  # cache positions past attn_len (0: attn_len is the whole cache, as the last bucket)
    window: int | None
    config: ta.DecodeConfig

    @property
    def seq(self) -> int:
        return self.attn_len + self.extra


CASES = {
    # batch 1 over 4 chunks, the last one partial
    "b1-gqa": Case((49,), 4, 2, 16, 50, 7, None, ta.DecodeConfig(chunk=16, block_n=16)),
    # multi-head; 2 tiles per chunk, the last chunk partial; rows at the first and last positions and
    # an idle one (past attn_len: it reads nothing)
    "b3-mha": Case((0, None, 44), 6, 6, 32, 45, 3, None, ta.DecodeConfig(chunk=32, block_n=16)),
    # 8 query heads on one KV head; window 20 starting mid-tile; a row with nothing in the first chunk
    "b5-window": Case((69, 0, None, 40, 19), 8, 1, 64, 70, 10, 20, ta.DecodeConfig(chunk=32, block_n=16)),
    # one chunk covers attn_len: the chunk kernel writes the output itself (no combine)
    "b3-one-chunk": Case((20, None, 0), 4, 2, 32, 37, 4, None, ta.DecodeConfig(chunk=64, block_n=16)),
    # attn_len is the whole cache: the idle row's scratch position is inside it and it attends like
    # any row; window of 8; D = 24
    "b5-last-bucket": Case((None, 40, 3, 25, 0), 4, 2, 24, 41, 0, 8, ta.DecodeConfig(chunk=16, block_n=16)),
}


def visible(pos: int, attn_len: int, window: int | None) -> range:
    return range(max(0, pos - window + 1) if window else 0, pos + 1 if pos < attn_len else 0)


def make_inputs(case: Case, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, d = len(case.positions), case.head_dim
    n_slots = b + 2  # two slots that no row owns
    slots = torch.randperm(n_slots, generator=g)[:b].unsqueeze(1)
    positions = torch.tensor([[case.seq - 1 if p is None else p] for p in case.positions])
    k_cache = torch.randn(n_slots, case.n_kv, case.seq, d, generator=g)
    v_cache = torch.randn(n_slots, case.n_kv, case.seq, d, generator=g)
    for slot, pos in zip(slots[:, 0].tolist(), positions[:, 0].tolist(), strict=True):
        hidden = torch.ones(case.seq, dtype=torch.bool)
        hidden[list(visible(pos, case.attn_len, case.window))] = False
        hidden[pos] = True  # stale until the call writes it
        k_cache[slot, :, hidden] = float("nan")
        v_cache[slot, :, hidden] = float("nan")
    return {
        "q": torch.randn(b, 1, case.n_heads, d, generator=g),
        "k": torch.randn(b, 1, case.n_kv, d, generator=g),
        # v as the engine passes it: a view into the fused q/k/v projection's output
        "v": torch.randn(b, 1, case.n_kv, 3 * d, generator=g)[..., d : 2 * d],
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slots": slots,
        "positions": positions,
    }


def written(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = cache.clone()
    out[slots, :, pos] = new
    return out


def reference(inputs: dict[str, torch.Tensor], case: Case, scale: float) -> torch.Tensor:
    """float64 attention of every query head over its row's visible keys; zeros when none."""
    q = inputs["q"][:, 0].double()
    k_cache = written(inputs["k_cache"], inputs["k"], inputs["slots"], inputs["positions"]).double()
    v_cache = written(inputs["v_cache"], inputs["v"], inputs["slots"], inputs["positions"]).double()
    group = case.n_heads // case.n_kv
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row, (slot, pos) in enumerate(zip(inputs["slots"][:, 0], inputs["positions"][:, 0], strict=True)):
        keys = list(visible(int(pos), case.attn_len, case.window))
        if keys:
            k = k_cache[slot][:, keys].repeat_interleave(group, dim=0)  # [heads, n, D]
            v = v_cache[slot][:, keys].repeat_interleave(group, dim=0)
            weights = torch.softmax(torch.einsum("hd,hnd->hn", q[row], k) * scale, dim=-1)
            out[row] = torch.einsum("hn,hnd->hd", weights, v)
    return out.reshape(len(case.positions), 1, -1)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) outputs, or a read the kernel must not make"
    return ((y.double() - ref).norm() / ref.norm()).item()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """model.rotate at each row's position, in x's dtype: x [B, 1, H, D], tables [S, D]."""
    at = positions.reshape(-1)
    return x * cos[at][:, None, None] + x.roll(x.shape[-1] // 2, dims=-1) * sin[at][:, None, None]


@pytest.mark.parametrize("rotate", [False, True], ids=["rotated-inputs", "rotates"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("nan_filled_empty")
def test_matches_reference_and_writes_only_the_new_tokens(name: str, rotate: bool) -> None:
    """rotate: q and k come unrotated with the model's rope tables, and the kernel rotates them."""
    case = CASES[name]
    inputs = make_inputs(case, seed=len(name))
    scale = case.head_dim**-0.5
    rope, expected = None, inputs
    if rotate:
        gen = torch.Generator().manual_seed(7)
        rope = tuple(torch.randn(case.seq, case.head_dim, generator=gen) for _ in range(2))
        expected = {**inputs} | {key: rotated(inputs[key], *rope, inputs["positions"]) for key in ("q", "k")}
    want = reference(expected, case, scale)
    caches = {key: written(inputs[key], expected[new], inputs["slots"], inputs["positions"])
              for key, new in (("k_cache", "k"), ("v_cache", "v"))}  # fmt: skip
    out = ta.decode_attention(**inputs, attn_len=case.attn_len, window=case.window, scale=scale,
                              config=case.config, rope=rope)  # fmt: skip
    assert out.shape == (len(case.positions), 1, case.n_heads * case.head_dim) and out.dtype == torch.float32
    assert rel_err(out, want) <= REL_TOL
    assert same_bits(inputs["k_cache"], caches["k_cache"]) and same_bits(inputs["v_cache"], caches["v_cache"])


@pytest.mark.usefixtures("nan_filled_empty")
def test_the_custom_op_traces_under_torch_compile_and_writes_the_cache() -> None:
    case = CASES["b3-mha"]
    inputs = make_inputs(case, seed=3)
    scale = case.head_dim**-0.5
    op = torch.ops.llmopt.decode_attention
    fn = torch.compile(lambda t: op(**t, attn_len=case.attn_len, window=None, scale=scale) * 2,
                       backend="aot_eager", fullgraph=True)  # fmt: skip
    want = reference(inputs, case, scale)
    caches = [written(inputs[key], inputs[new], inputs["slots"], inputs["positions"])
              for key, new in (("k_cache", "k"), ("v_cache", "v"))]  # fmt: skip
    out = fn(inputs)
    assert rel_err(out, 2 * want) <= REL_TOL
    assert same_bits(inputs["k_cache"], caches[0]) and same_bits(inputs["v_cache"], caches[1])


def test_chunks_fill_the_gpu_and_stay_few() -> None:
    """Llama-3-8B on 132 SMs, the sweep's best choices (BENCHMARKS.md §5): batch 1 splits finely,
    batch 32 and 128 not at all up to 1,024 positions; a long context never has more than
    MAX_CHUNKS chunks; tiles divide chunks."""
    assert ta.choose_config(1 * 8, 256, 128, sms=132).chunk == 64
    assert ta.choose_config(1 * 8, 4096, 128, sms=132).chunk == 128
    assert ta.choose_config(128 * 8, 256, 128, sms=132).chunk == 256
    assert ta.choose_config(32 * 8, 256, 128, sms=132).chunk == 256
    assert ta.choose_config(32 * 8, 1024, 128, sms=132).chunk == 1024
    assert ta.choose_config(128 * 8, 4096, 128, sms=132).chunk == ta.MAX_CHUNK
    assert -(-131072 // ta.choose_config(8, 131072, 128, sms=132).chunk) == ta.MAX_CHUNKS
    for rows, attn_len, d in ((1, 64, 128), (3, 97, 256), (64, 2048, 64)):
        cfg = ta.choose_config(rows * 8, attn_len, d, sms=132)
        assert cfg.chunk % cfg.block_n == 0


def test_engine_logits_are_the_same_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's decode through the kernel (forced on for the CPU) against torch's SDPA path, on
    a 2-layer Mistral with a 12-token sliding window and 4 query heads per KV head: three rows at
    different positions in a bucket of four (one idle row), crossing from the 64-position attention
    bucket into the last one (attn_len = the whole cache)."""
    from llmopt.engine.runner import DecoderRunner, PrefillChunk
    from tests.test_engine_logits import BASE, CONFIGS, random_model

    model_type, overrides = CONFIGS["mistral-sliding-window"]
    overrides = {**overrides, "num_hidden_layers": 2, "num_key_value_heads": 1}
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen) for n in (66, 45, 66)]
    prompts, slots = (58, 40, 62), (2, 0, 1)

    def run() -> list[torch.Tensor]:
        runner = DecoderRunner(engine_model.DecoderModel(random_model(model_type, overrides)), max_batch=4,
                               max_seq=96, use_graphs=False)  # fmt: skip
        runner.prefill([PrefillChunk(slot, seq[:n].tolist(), 0, False)
                        for seq, n, slot in zip(seqs, prompts, slots, strict=True)])  # fmt: skip
        position, steps = list(prompts), []
        while live := [i for i, seq in enumerate(seqs) if position[i] < len(seq)]:
            tokens = torch.stack([seqs[i][position[i]] for i in live])
            steps.append(runner.decode([slots[i] for i in live], tokens, [position[i] for i in live]))
            for i in live:
                position[i] += 1
        return steps

    monkeypatch.setattr(engine_model, "cpu_fast_path", lambda x: False)  # the "off" side: SDPA
    torch_path = run()
    calls = []
    kernel = ta.decode_attention
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: calls.append(a[7]) or kernel(*a, **kw))
    monkeypatch.setattr(engine_model, "triton_decode_path", lambda device, dtype: True)
    kernel_path = run()
    assert 64 in calls and 97 in calls  # attention lengths: the first bucket and the whole cache
    assert len(kernel_path) == len(torch_path)
    for a, b in zip(kernel_path, torch_path, strict=True):
        assert (a - b).abs().max().item() < 1e-4
