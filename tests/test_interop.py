"""The int8 checkpoint also loads in transformers through compressed-tensors, and agrees with llmopt."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmopt.models import LoadSpec, load_model
from llmopt.quant import cpu_kernels
from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
from llmopt.quant.linear import QuantLinear
from llmopt.quant.packing import unpack_int32
from llmopt.quant.schemes import QuantSpec, dequantize_int8

pytest.importorskip("compressed_tensors")
TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
    "never took up any book but the Baronetage"
)
# Tolerance: transformers decompresses to fp32 weights. llmopt's C++ CPU kernel computes in fp32;
# without it (no compiler) llmopt feeds bf16 activations to torch's int8 op (its fast path), which
# adds ~1% relative error to the logits (measured 1.1%).
LOGITS_REL_TOL = 0.03


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def int8_dir(smollm2_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "smollm2-int8"
    quantize_checkpoint("smollm2-135m", QuantizeSpec(QuantSpec("int8"), out=out, evaluate=False))
    return out


@pytest.fixture(scope="module")
def hf_model(int8_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(int8_dir, dtype=torch.float32)


def test_transformers_reads_exactly_our_integers_and_scales(int8_dir: Path, hf_model):
    from safetensors import safe_open

    with torch.no_grad():
        hf_model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    with safe_open(str(int8_dir / "model.safetensors"), framework="pt") as fh:
        for name in ("model.layers.3.mlp.down_proj", "lm_head"):
            q = unpack_int32(
                fh.get_tensor(f"{name}.weight_packed"), 8, fh.get_tensor(f"{name}.weight_shape")[1]
            )
            ours = dequantize_int8(q, fh.get_tensor(f"{name}.weight_scale"))
            theirs = hf_model.get_submodule(name).weight.float()
            # same integers and scales; the product may be rounded in the scale's dtype (bf16) there
            torch.testing.assert_close(theirs, ours, rtol=2**-8, atol=0)


def test_logits_agree_with_transformers_and_llmopt_runs_the_int8_kernel(int8_dir: Path, hf_model):
    hf = hf_model
    ours = load_model(str(int8_dir), LoadSpec(dtype="float32", device="cpu"))
    ids = torch.tensor([ours.tokenizer(TEXT)["input_ids"]])
    quant_linears = [m for m in ours.model.modules() if isinstance(m, QuantLinear)]
    assert len(quant_linears) == 30 * 7 + 1
    native = bool(cpu_kernels.available()) and cpu_kernels.ready()  # llmopt's C++ kernel built here
    kernel, op = ("llmopt.int8_linear_cpu", "int8_linear_cpu")
    if not native:
        kernel, op = ("aten._weight_int8pack_mm", "_weight_int8pack_mm")
    assert {m.kernel.name for m in quant_linears} == {kernel}
    assert not any(isinstance(m, torch.nn.Linear) for m in ours.model.modules())
    with torch.no_grad():
        expected = hf(ids).logits
        with OpCounter() as ops:
            got = ours.model(ids).logits
    assert ops.counts.get(op) == len(quant_linears)  # every linear, through the named op
    assert ops.counts.get("mm", 0) + ops.counts.get("addmm", 0) == 0  # no float matmul of weights anywhere
    rel = float((got - expected).norm() / expected.norm())
    assert rel < LOGITS_REL_TOL, rel
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
