"""What the server needs from the engine: UTF-8-safe streaming, stop strings held back and cut,
abort and deadlines that free slots at once, no slot leaks, refusals for what cannot fit, async
streams, and any other architecture served through transformers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from llmopt.engine import Engine, EngineConfig, SamplingParams
from llmopt.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llmopt.errors import InputError


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir: Path) -> Engine:
    return Engine.load(str(tiny_dir), EngineConfig(max_batch=3, max_seq=64, prefill_chunk=16))


def assert_no_leaks(engine: Engine) -> None:
    assert not engine.running and not engine.waiting and not engine.by_id
    assert sorted(engine.free_slots) == list(range(engine.config.max_batch))


def test_streamed_text_never_breaks_a_character(tiny_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Café au lait — 日本語のテキスト, emoji 🙂🎉 and ünïcödé to finish."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[])
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were held until their character completed


def test_stop_matcher_holds_back_and_cuts():
    matcher = StopMatcher(("</end>", "STOP"))
    assert matcher.feed("Hello </") == ("Hello ", False)  # "</" may start "</end>": held back
    assert matcher.feed("e") == ("", False)
    assert matcher.feed("x") == ("</ex", False)  # no longer a prefix: released
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.feed("OP and more") == ("", True)
    assert matcher.text == "Hello </ex "
    other = StopMatcher(("abc",))
    assert other.feed("xxab") == ("xx", False)
    assert other.finish() == "ab"  # the sequence ended for another reason: release the tail


def test_refuses_what_cannot_fit(tiny_engine: Engine):
    with pytest.raises(InputError, match="max_seq"):
        tiny_engine.add_request(list(range(10, 70)), SamplingParams(max_new_tokens=8))
    with pytest.raises(InputError, match="max_seq"):
        tiny_engine.add_request(list(range(10, 20)), SamplingParams(max_new_tokens=55))
    with pytest.raises(InputError, match="empty"):
        tiny_engine.add_request([], SamplingParams())
    with pytest.raises(InputError, match="Token ids"):
        tiny_engine.add_request([10**7], SamplingParams())
    [out] = tiny_engine.generate([list(range(10, 20))], SamplingParams(max_new_tokens=None, ignore_eos=True))
    assert len(out.token_ids) == 54 and out.finish_reason == "length"  # fills the cache, no further
    assert_no_leaks(tiny_engine)


def test_abort_and_deadline_free_slots_at_once(tiny_engine: Engine):
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    a = tiny_engine.add_request("one", long)
    b = tiny_engine.add_request("two", long, deadline_s=0.2)
    c = tiny_engine.add_request("three", long)
    d = tiny_engine.add_request("four", long)  # waits: three slots
    tiny_engine.step()
    assert d.slot == -1 and tiny_engine.slots_in_use == 3
    assert tiny_engine.abort(a.id) and a.finish_reason == "abort"
    assert tiny_engine.slots_in_use == 2 and not tiny_engine.abort(a.id)
    assert tiny_engine.abort(d.id) and d.finish_reason == "abort"  # a waiting request can go too
    b.deadline = 0.0  # its deadline has passed
    deltas = tiny_engine.step()
    assert b.finish_reason == "deadline" and any(x.finished and x.request_id == b.id for x in deltas)
    assert tiny_engine.slots_in_use == 1
    tiny_engine.abort(c.id)
    assert_no_leaks(tiny_engine)


@pytest.mark.parametrize("pipeline", [False, True])
def test_many_admit_retire_cycles_leak_nothing(tiny_dir: Path, pipeline: bool):
    tiny_engine = Engine.load(str(tiny_dir), EngineConfig(max_batch=3, max_seq=64, pipeline=pipeline))
    rng = random.Random(0)
    live = []
    for i in range(60):
        params = SamplingParams(
            max_new_tokens=rng.randint(1, 12), ignore_eos=True, temperature=rng.choice([0.0, 0.8]), seed=i
        )
        live.append(
            tiny_engine.add_request([rng.randint(10, 300) for _ in range(rng.randint(1, 40))], params)
        )
        for _ in range(rng.randint(0, 3)):
            tiny_engine.step()
        if rng.random() < 0.2:
            tiny_engine.abort(rng.choice(live).id)
        assert tiny_engine.slots_in_use <= tiny_engine.config.max_batch
    while tiny_engine.has_work():
        tiny_engine.step()
    assert all(r.finished for r in live) and not tiny_engine._in_flight
    for r in live:
        assert r.finish_reason == "abort" or len(r.output_ids) == r.max_new_tokens
        assert r.pending == 0
    assert_no_leaks(tiny_engine)


def test_async_streams_match_offline_generation(tiny_dir: Path):
    engine = Engine.load(str(tiny_dir), EngineConfig(max_batch=2, max_seq=64))
    prompts = ["The first prompt", "A second, longer prompt with more words in it", "Third"]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    offline = [o.text for o in engine.generate(prompts, params)]

    async def collect(prompt: str) -> tuple[str, str | None]:
        text, reason = "", None
        async for delta in engine.submit(prompt, params):
            text += delta.text
            reason = delta.finish_reason
        return text, reason

    async def main() -> list[tuple[str, str | None]]:
        return list(await asyncio.gather(*(collect(p) for p in prompts)))

    try:
        results = asyncio.run(main())
        assert [t for t, _ in results] == offline
        assert all(reason == "length" for _, reason in results)

        async def abandon() -> None:
            stream = engine.submit("abandoned", SamplingParams(max_new_tokens=40, ignore_eos=True))
            async for _ in stream:
                break  # the consumer walks away: the request must be aborted
            await stream.aclose()
            with pytest.raises(InputError, match="max_seq"):
                engine.submit(list(range(10, 80)), params)
            for _ in range(100):
                if not engine.has_work():
                    break
                await asyncio.sleep(0.02)

        asyncio.run(abandon())
        assert_no_leaks(engine)
        with pytest.raises(InputError, match="submit"):
            engine.generate(prompts, params)
    finally:
        engine.close()


def test_other_architectures_run_through_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120)).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    with pytest.warns(UserWarning, match="through transformers"):
        engine = Engine(model, None, EngineConfig(max_batch=2, max_seq=32))
    assert engine.backend == "transformers"
    outs = engine.generate(
        [[5, 17, 99, 3, 42], [1, 2, 3]], SamplingParams(max_new_tokens=10, ignore_eos=True)
    )
    assert outs[0].token_ids == expected
    assert_no_leaks(engine)


def test_max_batch_none_fills_the_free_memory(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import llmopt.engine.engine as engine_module

    free = 5 * 2**20
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: free)
    engine = Engine.load(str(tiny_dir), EngineConfig(max_batch=None, max_seq=64))
    shape = engine.runner.cache.shape
    expected = int(free * 0.9) // (shape.bytes_per_token * 65)
    assert 1 < expected < 256
    assert engine.config.max_batch == shape.max_batch == expected == len(engine.free_slots)
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: 1000)
    with pytest.raises(InputError, match="Lower --max-seq"):
        Engine.load(str(tiny_dir), EngineConfig(max_batch=None, max_seq=64))
