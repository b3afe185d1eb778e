"""The engine on the real built-in model: greedy tokens equal transformers' exactly, alone and inside a
continuously changing batch; a reused slot carries nothing over; stop strings cut exactly; seeded
sampling is reproducible whatever else is running."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.engine import Engine, EngineConfig, SamplingParams
from llmopt.models import LoadSpec, load_model

PROMPTS = [
    "Sir Walter Elliot, of Kellynch Hall, was",
    "Elizabeth Bennet walked into the room and",
    "The history of the Roman Empire began when",
    "To make a good cup of tea, you first",
]
NEW = 20
# transformers' greedy continuation of PROMPTS[0] (also pinned in test_smollm2.py, first 16 tokens)
SIR_WALTER = [253, 7411, 4110, 281, 260, 1463, 282, 260, 7598, 4702, 282, 38438, 2372, 282, 4528, 30]


@pytest.fixture(scope="module", params=[False, True], ids=["in-step", "pipelined"])
def setup(smollm2_dir: Path, request: pytest.FixtureRequest) -> tuple[Engine, dict[str, list[int]]]:
    """The engine streams each step's tokens in that step, or (as on CUDA) pipelined one step late."""
    loaded = load_model("smollm2-135m", LoadSpec(dtype="float32", device="cpu"))
    reference = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt, return_tensors="pt")
            out = loaded.model.generate(**ids, max_new_tokens=NEW, do_sample=False)
            reference[prompt] = out[0, ids["input_ids"].shape[1] :].tolist()
    config = EngineConfig(max_batch=4, max_seq=128, prefill_chunk=5, pipeline=request.param)
    engine = Engine(loaded.model, loaded.tokenizer, config)
    assert engine.backend == "llmopt"
    return engine, reference


def greedy(n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def assert_no_leaks(engine: Engine) -> None:
    assert not engine.running and not engine.waiting and not engine.by_id
    assert sorted(engine.free_slots) == list(range(engine.config.max_batch))


def test_reference_outputs_are_varied(setup):
    _, reference = setup
    assert reference[PROMPTS[0]][:16] == SIR_WALTER
    assert all(len(set(tokens)) >= 12 for tokens in reference.values())


def test_greedy_alone_equals_transformers(setup):
    engine, reference = setup
    for prompt in PROMPTS:
        [out] = engine.generate([prompt], greedy())
        assert out.token_ids == reference[prompt], prompt
        assert out.finish_reason == "length"
        assert out.text == engine.tokenizer.decode(reference[prompt], skip_special_tokens=True)
    assert_no_leaks(engine)


def test_greedy_inside_a_changing_batch(setup):
    engine, reference = setup
    a = engine.add_request(PROMPTS[0], greedy(8))  # retires early: its slot is reused by D
    b = engine.add_request(PROMPTS[1], greedy())
    for _ in range(5):  # a and b are decoding, at different positions
        engine.step()
    c = engine.add_request(PROMPTS[2], greedy())  # admitted mid-decode, prefilled in chunks of 5
    before = len(a.output_ids), len(b.output_ids)
    engine.step()
    assert 0 < c.prefilled < len(c.prompt_ids)  # c's prompt is longer than one chunk ...
    assert (len(a.output_ids), len(b.output_ids)) == (before[0] + 1, before[1] + 1)  # ... a, b go on
    assert len({len(r.prompt_ids) + len(r.output_ids) for r in (a, b, c)}) == 3
    assert all(r.slot >= 0 for r in (a, b, c))
    while not a.finished:
        engine.step()
    slot_of_a = 0
    d = engine.add_request(PROMPTS[3], greedy())
    engine.step()
    assert d.slot == slot_of_a  # the lowest free slot: a's, with a's stale cache behind it
    e = engine.add_request(PROMPTS[0], greedy())  # waits for a slot, then decodes beside the others
    while engine.has_work():
        engine.step()
    assert a.output_ids == reference[PROMPTS[0]][:8]
    for request, prompt in ((b, 1), (c, 2), (d, 3), (e, 0)):
        assert request.output_ids == reference[PROMPTS[prompt]], PROMPTS[prompt]
    assert_no_leaks(engine)


def test_stop_string_cuts_exactly(setup):
    engine, reference = setup
    full = engine.tokenizer.decode(reference[PROMPTS[1]], skip_special_tokens=True)
    stop = "sorry"
    assert stop in full
    [out] = engine.generate([PROMPTS[1]], greedy(stop=(stop, "never-appears")))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    [out] = engine.generate([PROMPTS[1]], greedy(stop_token_ids=(reference[PROMPTS[1]][5],)))
    assert out.finish_reason == "stop" and out.token_ids == reference[PROMPTS[1]][:6]


def test_seeded_sampling_is_reproducible_in_any_batch(setup):
    engine, _ = setup
    params = SamplingParams(
        max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True
    )
    [alone] = engine.generate([PROMPTS[2]], params)
    again = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [greedy(5), params, greedy(12)])[1]
    assert again.token_ids == alone.token_ids
    [other] = engine.generate([PROMPTS[2]], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other.token_ids != alone.token_ids
    [top1] = engine.generate(
        [PROMPTS[2]], SamplingParams(max_new_tokens=NEW, temperature=1.0, top_k=1, seed=5)
    )
    assert top1.token_ids == setup[1][PROMPTS[2]][: len(top1.token_ids)]
