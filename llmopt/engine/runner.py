"""Model runners: what the scheduler calls to fill a slot's cache (prefill) and to advance a set of
slots by one token (decode).

``DecoderRunner`` runs llmopt's own model over the slot cache. Decode always runs a bucket of
slots 0..B-1 (B from ``batch_buckets``) over the first L cache positions (L a power of two
covering the longest row), so its shapes are fixed per (B, L). On CUDA each (B, L) step is
captured once as a CUDA graph and replayed: one launch per step instead of hundreds, which is
what lets a batch-1 decode approach the memory-bandwidth floor. Idle rows of a bucket run at the
cache's scratch position and their outputs are ignored.

Prefill is host-bound at short prompts (a 128-token prompt on an 8B model: ~1,300 kernels, each
costing more to issue than to run), so a step's prefill chunks are also replayed from a CUDA graph
when their padded size, rows x width, is at most ``MAX_GRAPH_PREFILL`` tokens: captured once per
(rows bucket, width bucket, attention bucket, logits wanted). Each chunk is a row padded to its
width bucket (``prefill_bucket``) with tokens at the scratch position, missing rows are all
scratch, and the rows' slots are an input tensor, so one graph serves any slots.

``TransformersRunner`` runs any other causal LM through transformers, one sequence at a time
with its own dynamic cache per slot: slow, but every model works.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from llmopt.device import to_device
from llmopt.engine.kv_cache import CacheShape, KVCache
from llmopt.engine.model import DecoderModel
from llmopt.quant.triton_kernels import pow2_at_least

MIN_ATTN_BUCKET = 64
MIN_PREFILL_BUCKET = 16
COARSE_PREFILL_BUCKETS_FROM = 512  # widths past it round up to multiples of 256, not powers of two
# Padded tokens of a graphed prefill. At 1,024 tokens an eager quantized prefill was still host-bound
# on some H200 hosts (BENCHMARKS.md §5); past 2,048 the GPU time dominates on any of them.
MAX_GRAPH_PREFILL = 2048


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``tokens`` of the sequence in ``slot``, starting at position ``start``."""

    slot: int
    tokens: Sequence[int]
    start: int
    want_logits: bool  # the chunk ends the prompt: its last token's logits give the first new token


class Runner(Protocol):
    max_batch: int
    max_seq: int
    device: torch.device
    vocab_size: int
    capture_s: float
    compiled: bool

    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor | None]: ...

    def decode(
        self, slots: Sequence[int], tokens: torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor: ...

    def release(self, slot: int) -> None: ...


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to 32, then of 16: few graphs, little padding."""
    buckets = [b for b in (1, 2, 4) if b < max_batch]
    size = 8
    while size < max_batch:
        buckets.append(size)
        size += 8 if size < 32 else 16
    buckets.append(max_batch)
    return sorted(set(buckets))


def attention_bucket(longest: int, max_seq: int) -> int:
    """Smallest power of two ≥ longest (at least MIN_ATTN_BUCKET), capped at the cache length."""
    return min(pow2_at_least(longest, MIN_ATTN_BUCKET), max_seq + 1)


def prefill_bucket(width: int) -> int:
    """The padded width of a graphed prefill chunk: the smallest power of two ≥ width (at least
    MIN_PREFILL_BUCKET) up to COARSE_PREFILL_BUCKETS_FROM, then the smallest multiple of 256, where
    padding to a power of two would cost GPU time (600 tokens would run as 1,024)."""
    if width > COARSE_PREFILL_BUCKETS_FROM:
        return -(-width // 256) * 256
    return pow2_at_least(width, MIN_PREFILL_BUCKET)


class _Graph:
    def __init__(self, graph: Any, logits: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits


class DecoderRunner:
    def __init__(
        self,
        model: DecoderModel,
        max_batch: int,
        max_seq: int,
        use_graphs: bool | None = None,
        compile_decode: bool | None = None,
        static_prefill: bool | None = None,
    ) -> None:
        """``static_prefill`` (default: with ``use_graphs``): a step's prefill chunks run padded, on
        fixed input buffers, as a graph can replay them; without graphs they run that way eagerly."""
        spec = model.spec
        self.model = model
        self.device = model.device
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.vocab_size = spec.vocab_size
        self.cache = KVCache(
            CacheShape(spec.n_layers, max_batch, max_seq, spec.n_kv_heads, spec.head_dim, model.dtype),
            self.device,
        )
        model.build_rope(max_seq + 1)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.buckets = batch_buckets(max_batch)
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.full((max_batch, 1), max_seq, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.static_prefill = self.use_graphs if static_prefill is None else static_prefill
        self.prefill_graphs: dict[tuple[int, int, int, bool], _Graph] = {}
        self.prefill_tokens = torch.zeros(MAX_GRAPH_PREFILL, dtype=torch.long, device=self.device)
        self.prefill_positions = torch.zeros(MAX_GRAPH_PREFILL, dtype=torch.long, device=self.device)
        max_rows = MAX_GRAPH_PREFILL // MIN_PREFILL_BUCKET
        self.prefill_last = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.prefill_slot = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.pool: Any = None
        self.capture_s = 0.0
        self.step_model: Any = model
        self.compiled = self.device.type == "cuda" if compile_decode is None else compile_decode
        if self.compiled:  # inductor fuses the norms, rotary, residuals and activations of each layer
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
            self.step_model = torch.compile(model, dynamic=False)

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor | None]:
        """Logits [V] for each chunk that wants them. With ``static_prefill`` all the chunks run as one
        padded batch when it fits the graphs' limit; otherwise chunks of neighbouring slots run as one
        padded batch: padding and the rows of other slots in the range sit at the scratch position."""
        if self.static_prefill and chunks:
            rows, width = pow2_at_least(len(chunks), 1), prefill_bucket(max(len(c.tokens) for c in chunks))
            if rows * width <= MAX_GRAPH_PREFILL:
                return self._prefill_static(chunks, rows, width)
        by_slot = sorted(range(len(chunks)), key=lambda i: chunks[i].slot)
        results: list[torch.Tensor | None] = [None] * len(chunks)
        run: list[int] = []
        for i in by_slot:
            if run and chunks[i].slot != chunks[run[-1]].slot + 1:
                self._prefill_run([chunks[j] for j in run], run, results)
                run = []
            run.append(i)
        if run:
            self._prefill_run([chunks[j] for j in run], run, results)
        return results

    def _host_batch(
        self, chunks: Sequence[PrefillChunk], rows: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The chunks as ``rows`` rows of ``width`` tokens, on the host: tokens, positions (padding
        and rows past the chunks at the scratch position, whose cache row no real row reads), each
        row's last index, each row's slot (the first chunk's past the chunks), and the attention
        bucket covering every chunk."""
        tokens = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.full((rows, width), self.cache.scratch_position, dtype=torch.long)
        last = torch.zeros(rows, dtype=torch.long)
        slots = torch.full((rows,), chunks[0].slot, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            n = len(chunk.tokens)
            tokens[row, :n] = torch.tensor(list(chunk.tokens))
            positions[row, :n] = torch.arange(chunk.start, chunk.start + n)
            last[row], slots[row] = n - 1, chunk.slot
        attn_len = attention_bucket(max(c.start + len(c.tokens) for c in chunks), self.max_seq)
        return tokens, positions, last, slots, attn_len

    def _prefill_run(
        self, chunks: list[PrefillChunk], order: list[int], results: list[torch.Tensor | None]
    ) -> None:
        tokens, positions, last, _, attn_len = self._host_batch(
            chunks, len(chunks), max(len(c.tokens) for c in chunks)
        )
        logits = self.model(
            to_device(tokens, self.device),
            to_device(positions, self.device),
            self.cache,
            chunks[0].slot,
            attn_len,
            last_index=to_device(last, self.device),
            want_logits=any(c.want_logits for c in chunks),
        )
        for row, (chunk, index) in enumerate(zip(chunks, order, strict=True)):
            if chunk.want_logits and logits is not None:
                results[index] = logits[row]

    def _prefill_static(
        self, chunks: Sequence[PrefillChunk], rows: int, width: int
    ) -> list[torch.Tensor | None]:
        """The chunks as ``rows`` rows of ``width`` tokens (``_host_batch``) on the fixed prefill buffers:
        replayed from a CUDA graph when graphs are on. Returns copies of the logits (the graph's
        output buffer is overwritten by its next replay)."""
        tokens, positions, last, slots, attn_len = self._host_batch(chunks, rows, width)
        static_tokens = self.prefill_tokens[: rows * width].view(rows, width)
        static_positions = self.prefill_positions[: rows * width].view(rows, width)
        static_last, static_slots = self.prefill_last[:rows], self.prefill_slot[:rows]
        for target, source in ((static_tokens, tokens), (static_positions, positions), (static_last, last),
                               (static_slots, slots)):  # fmt: skip
            target.copy_(to_device(source, self.device))
        want_logits = any(c.want_logits for c in chunks)

        def run() -> torch.Tensor | None:
            return self.model(
                static_tokens, static_positions, self.cache, 0, attn_len, last_index=static_last,
                want_logits=want_logits, slot_index=static_slots,
            )  # fmt: skip

        if not self.use_graphs:
            logits = run()
        else:
            key = (rows, width, attn_len, want_logits)
            graph = self.prefill_graphs.get(key)
            if graph is None:  # one warm-up: it writes what the replay rewrites
                graph = self.prefill_graphs[key] = self._captured(run, warmups=1)
            graph.graph.replay()
            logits = graph.logits if want_logits else None
        return [
            logits[row].clone() if chunk.want_logits and logits is not None else None
            for row, chunk in enumerate(chunks)
        ]

    def _captured(self, run: Any, warmups: int) -> _Graph:
        """``run()`` (returning logits or None) captured as a CUDA graph in the runner's shared
        memory pool, after ``warmups`` runs outside it (lazy inits, compilation); capture time adds
        to ``capture_s``."""
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.pool = graph.pool()
        self.capture_s += time.perf_counter() - start
        return _Graph(graph, logits if logits is not None else torch.empty(0, device=self.device))

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Logits [len(slots), V] for one new token per slot (tokens on the device, [len(slots)])."""
        rows = max(slots) + 1
        bucket = next(b for b in self.buckets if b >= rows)
        attn_len = attention_bucket(max(positions) + 1, self.max_seq)
        index = to_device(list(slots), self.device)
        self.positions[:bucket].fill_(self.cache.scratch_position)
        self.positions[index, 0] = to_device(list(positions), self.device)
        self.tokens[index, 0] = tokens
        if not self.use_graphs:
            logits = self.step_model(self.tokens[:bucket], self.positions[:bucket], self.cache, 0, attn_len)
            assert logits is not None
            return logits[index]
        graph = self.graphs.get((bucket, attn_len)) or self._capture(bucket, attn_len)
        graph.graph.replay()
        return graph.logits[index]

    def _capture(self, bucket: int, attn_len: int) -> _Graph:
        tokens, positions = self.tokens[:bucket], self.positions[:bucket]

        def step() -> torch.Tensor:
            logits = self.step_model(tokens, positions, self.cache, 0, attn_len)
            assert logits is not None
            return logits

        captured = self._captured(step, warmups=2)  # warm-ups: lazy inits, compilation, autotuning
        self.graphs[(bucket, attn_len)] = captured
        return captured

    @torch.inference_mode()
    def capture_all(self, attn_lens: Sequence[int]) -> float:
        """Capture every batch bucket at the given attention lengths now (e.g. before timing)."""
        if self.use_graphs:
            for bucket in self.buckets:
                for attn_len in attn_lens:
                    if (bucket, attn_len) not in self.graphs:
                        self.positions[:bucket].fill_(self.cache.scratch_position)
                        self._capture(bucket, attn_len)
        return self.capture_s

    def release(self, slot: int) -> None:
        """Nothing to free: the next owner's prefill overwrites the positions it will read."""


class TransformersRunner:
    """Any causal LM, one sequence at a time, each slot with its own transformers cache."""

    def __init__(self, hf_model: Any, max_batch: int, max_seq: int) -> None:
        self.model = hf_model
        self.device = next(hf_model.parameters()).device
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.vocab_size = hf_model.config.vocab_size
        self.caches: dict[int, Any] = {}
        self.capture_s = 0.0
        self.compiled = False

    @torch.inference_mode()
    def _forward(self, slot: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        from transformers import DynamicCache

        if start == 0:
            self.caches[slot] = DynamicCache(config=self.model.config)
        cache = self.caches[slot]
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            attention_mask=torch.ones(1, start + ids.shape[1], dtype=torch.long, device=self.device),
        )
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1].float()

    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[torch.Tensor | None]:
        results: list[torch.Tensor | None] = []
        for chunk in chunks:
            ids = torch.tensor([list(chunk.tokens)], dtype=torch.long, device=self.device)
            logits = self._forward(chunk.slot, ids, chunk.start)
            results.append(logits if chunk.want_logits else None)
        return results

    def decode(self, slots: Sequence[int], tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        rows = [
            self._forward(slot, tokens[i].view(1, 1), position)
            for i, (slot, position) in enumerate(zip(slots, positions, strict=True))
        ]
        return torch.stack(rows)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)
