"""The engine: continuous batching over a slot cache.

Each ``step()``:
1. retires requests past their deadline or aborted;
2. admits waiting requests into free slots (lowest slot first, so decode buckets stay small);
3. prefills newcomers, at most ``prefill_chunk`` prompt tokens per step, so a long prompt never
   stalls the running batch for more than one chunk;
4. decodes one token for every running sequence in one batched forward;
5. samples all new tokens on the device in one call and reads them back once;
6. streams text deltas, applies stop conditions and frees the slots of finished sequences.

The core is synchronous (``step``/``generate``). ``submit`` serves asyncio callers: a background
thread owns the core and feeds each request's async stream.
"""

from __future__ import annotations

import heapq
import itertools
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmopt.device import free_memory_bytes, to_device
from llmopt.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llmopt.engine.kv_cache import fit_max_batch, kv_bytes_per_token
from llmopt.engine.model import DecoderModel, unsupported_reason
from llmopt.engine.runner import DecoderRunner, PrefillChunk, Runner, TransformersRunner
from llmopt.engine.sampling import SamplingParams, sample
from llmopt.errors import InputError

FILL_MAX_BATCH = 256


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int | None = 8  # sequences decoded together (cache slots); None: fill free memory
    max_seq: int = 2048  # prompt + generated tokens per sequence
    prefill_chunk: int = 512  # prompt tokens prefilled per step
    cuda_graphs: bool | None = None  # None: on for CUDA devices
    compile: bool | None = None  # torch.compile the decode step (fuses elementwise work); None: on CUDA
    pipeline: bool | None = None  # launch step N+1 before streaming step N's tokens; None: on CUDA

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError("max_batch must be at least 1 (or None to fill the free memory).")
        if self.max_seq < 2:
            raise InputError("max_seq must be at least 2.")
        if self.prefill_chunk < 1:
            raise InputError("prefill_chunk must be at least 1.")


@dataclass
class Delta:
    """A piece of one request's stream: new text (UTF-8-complete) and the token ids behind it. The
    last one has ``finished`` set and a ``finish_reason``: stop (EOS, a stop token or a stop
    string), length, abort, deadline or error."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    arrival_time: float
    token_times: list[float]  # perf_counter() when each token reached the host

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    arrival_time: float
    deadline: float | None
    on_delta: Callable[[Delta], None] | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    slot: int = -1
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None  # why a request ended with finish_reason 'error'
    pending: int = 0  # tokens sampled on the device, not yet read back

    @property
    def generated(self) -> int:
        """Tokens generated so far, including the one still on its way to the host."""
        return len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.id,
            self.prompt_ids,
            list(self.output_ids),
            self.text,
            self.finish_reason,
            self.arrival_time,
            list(self.token_times),
        )


@dataclass
class InFlight:
    """A launched step: its rows and their sampled tokens (a pinned host copy on CUDA, with the
    event that says the copy is done)."""

    rows: list[Request]
    tokens: torch.Tensor
    ready: Any


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)


class Engine:
    """Generation over a loaded transformers model. llmopt's own model code runs the Llama family;
    other architectures run through transformers (with a notice). The engine takes the model over:
    its float q/k/v and gate/up weights are fused in place, so do not use it elsewhere afterwards."""

    def __init__(self, model: Any, tokenizer: Any = None, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        reason = unsupported_reason(model)
        runner: Runner
        if reason is None:
            self.backend = "llmopt"
            decoder = DecoderModel(model)
            if self.config.max_batch is None:
                self.config = replace(self.config, max_batch=self._fill_batch(decoder))
            assert self.config.max_batch is not None
            runner = DecoderRunner(
                decoder,
                self.config.max_batch,
                self.config.max_seq,
                self.config.cuda_graphs,
                self.config.compile,
            )
        else:
            self.backend = "transformers"
            warnings.warn(
                f"llmopt runs this model through transformers, one sequence at a time: {reason}.",
                stacklevel=2,
            )
            if self.config.max_batch is None:  # its caches grow per sequence: nothing to fill
                self.config = replace(self.config, max_batch=EngineConfig.max_batch)
            assert self.config.max_batch is not None
            runner = TransformersRunner(model, self.config.max_batch, self.config.max_seq)
        self.runner = runner
        self.device = runner.device
        self.free_slots = list(range(runner.max_batch))
        heapq.heapify(self.free_slots)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # slot owners, in admission order
        self.by_id: dict[str, Request] = {}
        self._ids = itertools.count()
        self.seen = torch.zeros(runner.max_batch, runner.vocab_size, dtype=torch.bool, device=self.device)
        self.pipelined = self.device.type == "cuda" if self.config.pipeline is None else self.config.pipeline
        self.last_token = torch.zeros(runner.max_batch, dtype=torch.long, device=self.device)
        self._in_flight: InFlight | None = None
        self._background: Any = None

    def _fill_batch(self, decoder: DecoderModel) -> int:
        """As many slots of max_seq tokens as 90% of the free device memory holds (at most
        FILL_MAX_BATCH: buckets, graphs and the penalty table grow with the slot count)."""
        spec = decoder.spec
        per_token = kv_bytes_per_token(spec.n_layers, spec.n_kv_heads, spec.head_dim, decoder.dtype)
        fit = fit_max_batch(per_token, self.config.max_seq, free_memory_bytes(decoder.device))
        return min(fit, FILL_MAX_BATCH)

    @classmethod
    def load(cls, model: str, config: EngineConfig | None = None, spec: Any = None) -> Engine:
        """Load a model argument (built-in name or directory, plain or llmopt-quantized) and wrap it."""
        from llmopt.models import LoadSpec, load_model

        loaded = load_model(model, spec or LoadSpec())
        return cls(loaded.model, loaded.tokenizer, config)

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("This model has no tokenizer; pass prompts as lists of token ids.")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.runner.vocab_size for i in ids):
            raise InputError(f"Token ids must lie in [0, {self.runner.vocab_size}).")
        return ids

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
        on_delta: Callable[[Delta], None] | None = None,
    ) -> Request:
        """Validate and build a request (not yet queued). Refuses what cannot fit max_seq."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise InputError("The prompt is empty; give at least one token.")
        max_seq = self.config.max_seq
        room = max_seq - len(ids)
        wanted = params.max_new_tokens if params.max_new_tokens is not None else 1
        if room < wanted:
            raise InputError(
                f"The prompt has {len(ids)} tokens and asks for {wanted} more, beyond this engine's "
                f"max_seq of {max_seq}. Shorten the prompt, lower max_new_tokens or raise max_seq."
            )
        if params.stop and self.tokenizer is None:
            raise InputError("Stop strings need a tokenizer; this model has none. Use stop_token_ids.")
        if deadline_s is not None and deadline_s <= 0:
            raise InputError("deadline_s must be positive.")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.by_id:
            raise InputError(f"Request id '{rid}' is already in use.")
        now = time.perf_counter()
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        return Request(
            id=rid,
            prompt_ids=ids,
            params=params,
            seed=params.resolved_seed(),
            max_new_tokens=params.max_new_tokens if params.max_new_tokens is not None else room,
            stop_ids=stop_ids,
            arrival_time=now,
            deadline=now + deadline_s if deadline_s is not None else None,
            on_delta=on_delta,
            detokenizer=(
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                if self.tokenizer is not None
                else None
            ),
            stops=StopMatcher(params.stop),
        )

    def add(self, request: Request) -> Request:
        if request.id in self.by_id:
            raise InputError(f"Request id '{request.id}' is already in use.")
        self.by_id[request.id] = request
        self.waiting.append(request)
        return request

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> Request:
        return self.add(self.make_request(prompt, params, request_id=request_id, deadline_s=deadline_s))

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its slot. False if it is unknown or already finished; from
        outside the engine's thread while ``submit()`` streams run, it is queued for the next step
        boundary and returns True."""
        if self._background is not None and not self._background.in_engine_thread():
            return self._background.abort(request_id)
        request = self.by_id.get(request_id)
        if request is None or request.finished:
            return False
        self._finish(request, "abort")
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    @property
    def slots_in_use(self) -> int:
        return self.runner.max_batch - len(self.free_slots)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[Delta]:
        """One scheduling step; returns the deltas it produced (also sent to each request's callback).

        Pipelined (the default on CUDA): this step's forward and sampling are launched before the
        previous step's tokens are read back and streamed, so the host's bookkeeping overlaps the
        device's work instead of idling it. A sequence that stops on EOS or a stop string is then
        decoded one extra step, whose token is dropped; length limits are known in advance. On a
        CPU the device is the host, so tokens are streamed in the step that made them."""
        deltas: list[Delta] = []
        now = time.perf_counter()
        for request in [*self.running, *self.waiting]:
            if request.deadline is not None and now >= request.deadline:
                deltas.append(self._finish(request, "deadline"))
        self._admit()
        launched = self._launch()
        if self._in_flight is not None:
            deltas.extend(self._emit(self._in_flight))
        self._in_flight = launched
        if not self.pipelined and launched is not None:
            deltas.extend(self._emit(launched))
            self._in_flight = None
        return deltas

    def _launch(self) -> InFlight | None:
        """Queue prefill chunks, one decode step and the sampler on the device; return what to
        read back later. Decode inputs are the previous samples, read on the device."""
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        decoding = [
            r for r in self.running if 0 < r.generated < r.max_new_tokens and r.prefilled == len(r.prompt_ids)
        ]
        budget = self.config.prefill_chunk
        chunks: list[tuple[Request, PrefillChunk]] = []
        for request in self.running:
            todo = len(request.prompt_ids) - request.prefilled
            if todo == 0 or budget == 0:
                continue
            n = min(todo, budget)
            piece = request.prompt_ids[request.prefilled : request.prefilled + n]
            chunks.append((request, PrefillChunk(request.slot, piece, request.prefilled, n == todo)))
            request.prefilled += n
            budget -= n
        if chunks:
            outs = self.runner.prefill([chunk for _, chunk in chunks])
            for (request, prefill), out in zip(chunks, outs, strict=True):
                if prefill.want_logits:
                    assert out is not None
                    rows.append(request)
                    logits.append(out.unsqueeze(0))
        if decoding:
            slot_ids = [r.slot for r in decoding]
            tokens = self.last_token[to_device(slot_ids, self.device)]
            positions = [len(r.prompt_ids) + r.generated - 1 for r in decoding]
            logits.append(self.runner.decode(slot_ids, tokens, positions))
            rows.extend(decoding)
        if not rows:
            return None
        new = self._sample(rows, torch.cat(logits))
        for request in rows:
            request.pending += 1
        if new.device.type == "cuda":
            host = torch.empty(new.shape, dtype=new.dtype, pin_memory=True)
            host.copy_(new, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return InFlight(rows, host, ready)
        return InFlight(rows, new, None)

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self.free_slots)
            self.running.append(request)
            if request.params.repetition_penalty != 1.0:
                self.seen[request.slot].zero_()
                self.seen[request.slot, to_device(request.prompt_ids, self.device)] = True

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        penalised = [r for r in rows if r.params.repetition_penalty != 1.0]
        slots = to_device([r.slot for r in rows], self.device)
        new = sample(
            logits,
            [r.params for r in rows],
            [r.seed for r in rows],
            [r.generated for r in rows],
            self.seen[slots] if penalised else None,
        )
        if penalised:
            self.seen[slots, new] = True  # rows without a penalty never read their row of `seen`
        self.last_token[slots] = new  # the next decode step's inputs, without a trip to the host
        return new

    def _emit(self, flight: InFlight) -> list[Delta]:
        """Read a launched step's tokens back (its one synchronisation) and stream them."""
        if flight.ready is not None:
            flight.ready.synchronize()
        token_ids = flight.tokens.tolist()
        stamp = time.perf_counter()
        deltas = []
        for request, token in zip(flight.rows, token_ids, strict=True):
            request.pending -= 1
            if request.finished:
                continue  # stopped (or aborted) after this step was launched: the token is dropped
            request.output_ids.append(token)
            request.token_times.append(stamp)
            deltas.append(self._advance(request, token))
        return deltas

    def _advance(self, request: Request, token: int) -> Delta:
        text, reason, hit = "", None, False
        if token in request.stop_ids:
            reason = "stop"
        else:
            piece = request.detokenizer.push(token) if request.detokenizer else ""
            text, hit = request.stops.feed(piece)
            if hit:
                reason = "stop"
            elif len(request.output_ids) >= request.max_new_tokens:
                reason = "length"
        request.text += text
        if reason is None:
            delta = Delta(request.id, text, [token])
            if request.on_delta:
                request.on_delta(delta)
            return delta
        return self._finish(request, reason, text, [token], cut=hit)

    def _finish(
        self,
        request: Request,
        reason: str,
        text: str = "",
        token_ids: list[int] | None = None,
        cut: bool = False,
    ) -> Delta:
        """End a request, free its slot and send its last delta. Unless a stop string already cut
        the text (``cut``), release what the detokenizer and the stop matcher still hold."""
        if not cut:
            tail = request.detokenizer.flush() if request.detokenizer else ""
            rest, hit = request.stops.feed(tail)
            if not hit:
                rest += request.stops.finish()
            text += rest
            request.text += rest
        request.finish_reason = reason
        if request.slot >= 0:
            self.running.remove(request)
            self.runner.release(request.slot)
            heapq.heappush(self.free_slots, request.slot)
            request.slot = -1
        elif request in self.waiting:
            self.waiting.remove(request)
        self.by_id.pop(request.id, None)
        delta = Delta(request.id, text, token_ids or [], finished=True, finish_reason=reason)
        if request.on_delta:
            request.on_delta(delta)
        return delta

    # ---- offline --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion (all admitted as slots allow) and return them in order."""
        if self._background is not None:
            raise InputError("generate() cannot run while the engine serves submit() streams; use submit().")
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise InputError("Give one SamplingParams, or one per prompt.")
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        for request in requests:
            self.add(request)
        while any(not r.finished for r in requests):
            self.step()
        if self._in_flight is not None and not self.running and not self.waiting:
            self.step()  # read back the dropped tokens of a last, pipelined step: the engine idles
        return [r.output() for r in requests]

    # ---- streaming --------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        deadline_s: float | None = None,
    ) -> Any:
        """Queue a request from asyncio code; returns its ``RequestStream`` (an async iterator of
        ``Delta``). Invalid requests raise here, before anything is queued."""
        from llmopt.engine.stream import BackgroundLoop, RequestStream

        if self._background is None:
            self._background = BackgroundLoop(self)
        stream = RequestStream(self)
        request = self.make_request(
            prompt, params, request_id=request_id, deadline_s=deadline_s, on_delta=stream.deliver
        )
        stream.request = request
        self._background.submit(request)
        return stream

    def close(self) -> None:
        """Stop the background thread (if any); running streams end with finish_reason 'abort'."""
        if self._background is not None:
            self._background.stop()
            self._background = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
