"""Time torch's low-bit CPU ops against a plain fp32 matmul, with fp32 and bf16 activations.

Why QuantLinear casts activations to bf16 on CPU: the int8/int4 ops are vectorised for bf16 only.
Run: python examples/cpu_lowbit_ops.py   (smollm2's MLP shape, 1536x576, group 64)
"""

import torch
import torch.utils.benchmark as tb

N, K, G = 1536, 576, 64
torch.manual_seed(0)
w = torch.randn(N, K)
q8 = torch.randint(-127, 127, (N, K), dtype=torch.int8)
s8 = torch.rand(N) + 0.5
w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
sz = torch.rand(K // G, N, 2)
CASES = {
    "fp32 matmul": "x @ w.T",
    "int8 op, fp32 act": "torch.ops.aten._weight_int8pack_mm(x, q8, s8)",
    "int8 op, bf16 act": "torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, s8.bfloat16())",
    "int8 fp32 dequant tile": "x @ (q8.float() * s8[:, None]).T",
    "int4 op, fp32 act": "torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, G, sz)",
    "int4 op, bf16 act": "torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w4, G, sz.bfloat16())",
}
print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
for m in (1, 8, 1024):
    x = torch.randn(m, K)
    for label, stmt in CASES.items():
        env = {"x": x, "w": w, "q8": q8, "s8": s8, "w4": w4, "sz": sz, "G": G, "torch": torch}
        t = tb.Timer(stmt, globals=env).blocked_autorange(min_run_time=0.3)
        print(f"M={m:5d} {label:20s} {t.median * 1e6:10.0f} us")
