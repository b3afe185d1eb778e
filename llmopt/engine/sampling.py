"""Sampling parameters and the on-device sampler.

Randomness is counter-based: the uniform number for (request seed, generated-token index,
vocabulary id) is an integer hash of the three, computed on the device in one vectorised
expression, then turned into Gumbel noise (``argmax(logits / T + Gumbel)`` samples the softmax).
Each request therefore has its own seeded generator whose draws depend on nothing else: the
same seed gives the same tokens alone or inside any batch, on any step schedule, with no
per-request generator objects and no host round trip.

Order of operations follows transformers: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmopt.device import to_device
from llmopt.errors import InputError

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an odd 28-bit multiplier: products of 32-bit values stay inside int64


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature=0`` is greedy (the default)."""

    max_new_tokens: int | None = 128  # None: until a stop condition or the cache's max_seq
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in prompt or output
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # do not stop at the model's EOS ids (benchmarks)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise InputError("temperature must be ≥ 0 (0 is greedy).")
        if self.top_k < 0:
            raise InputError("top_k must be ≥ 0 (0 turns it off).")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("top_p must be in (0, 1].")
        if self.repetition_penalty <= 0:
            raise InputError("repetition_penalty must be > 0 (1 turns it off).")
        if any(not s for s in self.stop):
            raise InputError("stop strings must not be empty.")
        if self.seed is not None and self.seed < 0:
            raise InputError("seed must be ≥ 0.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolved_seed(self) -> int:
        return (self.seed if self.seed is not None else secrets.randbits(31)) & 0x7FFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (values stay below 2**60, so nothing overflows)."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] Gumbel(0, 1) noise, a pure function of (seed, counter, token id)."""
    row = _hash32(_hash32(seeds & _MASK32) ^ (counters & _MASK32))
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32((row.unsqueeze(1) + ids * 0x9E3779B1) & _MASK32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on every token seen so far: divide positive scores, multiply negative ones."""
    p = penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what lies outside each row's top-k, then outside its top-p nucleus of the rest."""
    vocab = logits.shape[-1]
    ordered, _ = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    rank = torch.arange(vocab, device=logits.device)
    ordered = ordered.masked_fill(rank >= k.unsqueeze(1), float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each candidate
    keep = ((before < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1)) & (rank < k.unsqueeze(1))
    keep[:, 0] = True
    kept = keep.sum(dim=-1, keepdim=True)
    threshold = ordered.gather(1, kept - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    counters: Sequence[int],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [rows] (on the logits' device) for rows of fp32 logits [rows, vocab]."""
    device = logits.device
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = to_device([p.repetition_penalty for p in params], device, logits.dtype)
        logits = apply_repetition_penalty(logits, seen, penalty)
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy
    temperature = to_device([p.temperature if not p.greedy else 1.0 for p in params], device)
    scaled = logits / temperature.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        top_k = to_device([p.top_k for p in params], device)
        top_p = to_device([p.top_p for p in params], device, logits.dtype)
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    noise = gumbel_noise(
        to_device(list(seeds), device, torch.int64),
        to_device(list(counters), device, torch.int64),
        logits.shape[-1],
    )
    sampled = (scaled + noise).argmax(dim=-1)
    is_greedy = to_device([p.greedy for p in params], device)
    return torch.where(is_greedy, greedy, sampled)
