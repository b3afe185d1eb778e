"""Weight-only int8/int4 quantization: schemes, QuantLinear and its kernels, checkpoints, quality."""
