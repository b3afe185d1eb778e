"""``llmopt generate``: run prompts through llmopt's engine; one prompt streams as it is decoded."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from llmopt.cli.common import JsonFlag, ModelArg, TrustRemoteCode, err, handle_errors
from llmopt.errors import InputError


@handle_errors
def generate(
    model: ModelArg,
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts (batched together).")],
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy (deterministic).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample within this probability mass (1: off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1: off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampler (same seed, same text).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    max_seq: Annotated[int, typer.Option(help="Prompt + new tokens per sequence (cache size).")] = 2048,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (checkpoint dtype on GPU, fp32 on CPU), bf16, fp16, fp32.")
    ] = "auto",
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonFlag = False,
) -> None:
    """Generate text with llmopt's engine (continuous batching, CUDA graphs on a GPU).

    Example: llmopt generate smollm2-135m "The capital of France is" --max-new-tokens 16
    """
    from llmopt.engine import Engine, EngineConfig, SamplingParams
    from llmopt.models import LoadSpec

    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop or ()),
    )
    spec = LoadSpec(dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    engine = Engine.load(model, EngineConfig(max_batch=len(prompts), max_seq=max_seq), spec)
    if engine.tokenizer is None:
        raise InputError(
            f"'{model}' has no tokenizer; pass token ids through the Python API (llmopt.engine)."
        )
    if len(prompts) == 1 and not as_json:  # stream the text as it is decoded
        request = engine.add_request(prompts[0], params)
        while not request.finished:
            for delta in engine.step():
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        err.print(
            f"[{request.finish_reason}, {len(request.output_ids)} tokens]", highlight=False, markup=False
        )
        return
    outputs = engine.generate(prompts, params)
    if as_json:
        doc = [
            {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "ttft_s": out.ttft_s,
            }
            for prompt, out in zip(prompts, outputs, strict=True)
        ]
        typer.echo(json.dumps(doc, indent=2))
        return
    for prompt, out in zip(prompts, outputs, strict=True):
        typer.echo(f"{prompt}{out.text}\n[{out.finish_reason}, {len(out.token_ids)} tokens]\n")
