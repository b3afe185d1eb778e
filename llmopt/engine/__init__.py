"""llmopt's generation engine: own Llama-family model code over a static slot KV cache, CUDA-graph
decode, continuous batching and on-device sampling.

    from llmopt.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.load("smollm2-135m", EngineConfig(max_batch=4, max_seq=512))
    [out] = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=16))
    print(out.text)
"""

from llmopt.engine.engine import Delta, Engine, EngineConfig, RequestOutput
from llmopt.engine.sampling import SamplingParams

__all__ = ["Delta", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
