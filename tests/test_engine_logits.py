"""llmopt's own model code against transformers, logit for logit, on small random configs that
exercise what could go wrong: biases, norm weights other than 1, grouped-query attention, rope
scaling past the original context, sliding windows shorter than the sequence, q/k norms, a head
dimension that is not hidden/heads. Several sequences of different lengths share the slot cache,
are prefilled in chunks and then decoded together, as the engine runs them."""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.model import DecoderModel, unsupported_reason
from llmopt.engine.runner import DecoderRunner, PrefillChunk

TOLERANCE = 2e-4  # max |Δlogit| in fp32; logits are O(1) here

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

CONFIGS = {
    "llama3-rope-scaling-biases": (
        "llama",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,  # the test's sequences run far past it
            },
        ),
    ),
    "llama-tied-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=12, head_dim=16)),
    "qwen2-biases": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32, num_key_value_heads=1)),
}


def random_model(model_type: str, overrides: dict) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("static_prefill", [False, True], ids=["eager-prefill", "static-prefill"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name: str, static_prefill: bool):
    """static_prefill: a step's chunks run as one batch padded to powers of two (rows and width) on
    the fixed buffers a CUDA graph replays (scratch-position padding, a missing fourth row, the slots
    as a tensor), here without the graph; eager: neighbouring slots run as one padded batch."""
    model_type, overrides = CONFIGS[name]
    hf = random_model(model_type, overrides)
    assert unsupported_reason(hf) is None
    generator = torch.Generator().manual_seed(1)
    lengths = [70, 41, 55]  # total lengths; prompts are the first `prompt` tokens
    prompts = [23, 5, 40]  # the second prompt ends inside the first chunk
    seqs = [torch.randint(0, BASE["vocab_size"], (n,), generator=generator) for n in lengths]
    with torch.no_grad():
        reference = [hf(seq.unsqueeze(0)).logits[0] for seq in seqs]

    runner = DecoderRunner(
        DecoderModel(hf), max_batch=5, max_seq=96, use_graphs=False, static_prefill=static_prefill
    )
    slots = [0, 3, 1]  # rows need not be in slot order; eager: 0 and 1 as one padded batch, 3 alone
    got: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
    start = [0, 0, 0]
    for chunk in (7, 100):  # a short chunk first: chunked prefill must equal one pass
        pieces, owners = [], []
        for i, (seq, prompt, slot) in enumerate(zip(seqs, prompts, slots, strict=True)):
            end = min(prompt, start[i] + chunk)
            if end > start[i]:
                pieces.append(PrefillChunk(slot, seq[start[i] : end].tolist(), start[i], end == prompt))
                owners.append(i)
            start[i] = end
        for piece, i, logits in zip(pieces, owners, runner.prefill(pieces), strict=True):
            if piece.want_logits:
                assert logits is not None
                got[i][prompts[i] - 1] = logits
    position = list(prompts)
    while any(p < n for p, n in zip(position, lengths, strict=True)):
        live = [i for i, (p, n) in enumerate(zip(position, lengths, strict=True)) if p < n]
        tokens = torch.stack([seqs[i][position[i]] for i in live])
        logits = runner.decode([slots[i] for i in live], tokens, [position[i] for i in live])
        for row, i in enumerate(live):
            got[i][position[i]] = logits[row]
            position[i] += 1

    for i, ref in enumerate(reference):
        for pos, logits in got[i].items():
            err = (logits - ref[pos]).abs().max().item()
            assert err < TOLERANCE, f"sequence {i} position {pos}: max |Δlogit| {err:.2e}"
        assert len(got[i]) == lengths[i] - prompts[i] + 1


def test_static_prefill_takes_batches_up_to_its_limit():
    """Prefill batches of up to MAX_GRAPH_PREFILL padded tokens (rows a power of two x the width
    bucket) run on the fixed (graph) buffers, larger ones eagerly; both give the plain path's logits."""
    from llmopt.engine import runner as runner_module

    limit = runner_module.MAX_GRAPH_PREFILL
    hf = random_model("llama", {"max_position_embeddings": limit + 16})
    model = DecoderModel(hf)
    seq = torch.randint(0, BASE["vocab_size"], (limit + 1,), generator=torch.Generator().manual_seed(3))
    plain = DecoderRunner(model, max_batch=4, max_seq=limit + 8, use_graphs=False)
    static = DecoderRunner(model, max_batch=4, max_seq=limit + 8, use_graphs=False, static_prefill=True)
    taken: list[tuple[int, int]] = []
    original = static._prefill_static

    def spy(chunks, rows, width):
        taken.append((rows, width))
        return original(chunks, rows, width)

    static._prefill_static = spy  # type: ignore[method-assign]
    quarter = limit // 4
    wide = runner_module.prefill_bucket(quarter + 1)  # a quarter + 1 rounds up to less than a half
    assert quarter < wide < limit // 2
    batches = [
        [(1, limit)],  # one row at the limit: static
        [(1, limit + 1)],  # one more: eager
        [(0, quarter), (1, quarter - 3), (3, 5)],  # 4 rows (one missing) x a quarter: static
        [(0, quarter + 1), (1, 5)],  # 2 rows x `wide`: static
        [(0, quarter + 1), (1, 5), (3, 9)],  # 4 rows x `wide`: eager
    ]
    for batch in batches:
        chunks = [PrefillChunk(slot, seq[:n].tolist(), 0, True) for slot, n in batch]
        for want, got in zip(plain.prefill(chunks), static.prefill(chunks), strict=True):
            assert want is not None and got is not None
            assert (got - want).abs().max().item() < TOLERANCE
    assert taken == [(1, limit), (4, quarter), (2, wide)]


def test_other_architectures_are_reported_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert "gpt2" in (unsupported_reason(model) or "")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoints_run_through_their_quant_linears(tiny_dir, tmp_path, scheme: str):
    """An llmopt int8/int4 checkpoint: the engine keeps its QuantLinear modules (no fusion, no float
    copy) and its logits equal transformers' forward over the same modules."""
    from llmopt.models import LoadSpec, load_model
    from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
    from llmopt.quant.linear import QuantLinear
    from llmopt.quant.schemes import QuantSpec

    out = tmp_path / f"tiny-{scheme}"
    quantize_checkpoint(str(tiny_dir), QuantizeSpec(QuantSpec(scheme, method="rtn"), out=out, evaluate=False))
    spec = LoadSpec(dtype="float32", device="cpu")
    hf = load_model(str(out), spec).model
    seq = torch.randint(10, hf.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf(seq.unsqueeze(0)).logits[0]
    model = DecoderModel(load_model(str(out), spec).model)
    layer = model.layers[0]
    assert all(isinstance(p, QuantLinear) for p in [*layer.qkv.parts, *layer.gate_up.parts, model.lm_head])
    runner = DecoderRunner(model, max_batch=1, max_seq=32, use_graphs=False)
    [logits] = runner.prefill([PrefillChunk(0, seq[:20].tolist(), 0, True)])
    assert logits is not None
    errs = [(logits - reference[19]).abs().max().item()]
    for p in range(20, 30):
        errs.append((runner.decode([0], seq[p : p + 1], [p])[0] - reference[p]).abs().max().item())
    assert max(errs) < 1e-3 * reference.abs().max().item() + 1e-4, errs
