"""The on-device sampler against transformers' logits processors, and the counter-based noise."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    gumbel_noise,
    sample,
)
from llmopt.errors import InputError


def test_samples_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 40_000
    noise = gumbel_noise(torch.full((n,), 3), torch.arange(n), 5)
    picks = (logits / 0.7 + noise).argmax(-1)
    counts = torch.bincount(picks, minlength=5).float() / n
    expected = (logits[0] / 0.7).softmax(-1)
    assert (counts - expected).abs().max() < 0.01


def test_noise_is_a_pure_function_of_seed_and_counter():
    a = gumbel_noise(torch.tensor([7, 8]), torch.tensor([0, 0]), 1000)
    b = gumbel_noise(torch.tensor([8, 7]), torch.tensor([0, 0]), 1000)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert torch.isfinite(a).all()
    later = gumbel_noise(torch.tensor([7]), torch.tensor([1]), 1000)
    assert not torch.equal(later[0], a[0])


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (20, 0.5), (1, 0.3), (0, 1.0)])
def test_top_k_top_p_keep_the_same_tokens_as_transformers(top_k: int, top_p: float):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ours = filter_top_k_top_p(logits, torch.full((4,), top_k), torch.full((4,), top_p))
    theirs = logits.clone()
    if top_k:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seen_ids = torch.tensor([[1, 4, 4, 30], [0, 2, 49, 7]])
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen.scatter_(1, seen_ids, True)
    ours = apply_repetition_penalty(logits, seen, torch.tensor([1.3, 1.3]))
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    assert torch.allclose(ours, theirs)


def test_greedy_rows_and_sampled_rows_mix():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=1)]
    assert sample(logits, params, [0, 1], [0, 0]).tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"max_new_tokens": 0},
        {"repetition_penalty": 0},
        {"stop": ("",)},
        {"seed": -1},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InputError):
        SamplingParams(**kwargs)
