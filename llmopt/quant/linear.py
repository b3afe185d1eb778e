"""QuantLinear: a linear layer that holds only low-bit weights and scales (no 16-bit copy)."""

from __future__ import annotations

import torch
from torch import nn

from llmopt.quant.kernels import LayerShape, QuantKernel, select_kernel


class QuantLinear(nn.Module):
    """``y = x @ dequant(W).T + b`` computed by the kernel chosen once, at construction."""

    def __init__(
        self,
        shape: LayerShape,
        kernel: QuantKernel,
        buffers: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.in_features = shape.in_features
        self.out_features = shape.out_features
        self.kernel = kernel
        self._buffer_names = tuple(buffers)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_quantized(
        cls,
        shape: LayerShape,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        bias: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> QuantLinear:
        """Build from checkpoint integers; the kernel is selected here, from device and shape."""
        kernel = select_kernel(shape, device, dtype)
        buffers = kernel.prepare(q, scale, zero_point, shape, device, dtype)
        if bias is not None:
            bias = bias.to(device=device, dtype=dtype)
        return cls(shape, kernel, buffers, bias)

    @classmethod
    def fuse(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One QuantLinear computing several layers over the same input (outputs side by side), or
        None when they differ in scheme, group or kernel, or the kernel's layout does not stack."""
        first = layers[0]
        same = all(
            layer.kernel is first.kernel
            and (layer.shape.scheme, layer.in_features, layer.shape.group_size)
            == (first.shape.scheme, first.in_features, first.shape.group_size)
            for layer in layers
        )
        if not same:
            return None
        buffers = first.kernel.concat([layer.kernel_buffers() for layer in layers])
        if buffers is None:
            return None
        bias = None
        present = [layer.bias for layer in layers if layer.bias is not None]
        if present:
            bias = torch.cat([
                layer.bias.detach() if layer.bias is not None else present[0].new_zeros(layer.out_features)
                for layer in layers
            ])  # fmt: skip
        out_features = sum(layer.out_features for layer in layers)
        shape = LayerShape(first.shape.scheme, first.in_features, out_features, first.shape.group_size)
        return cls(shape, first.kernel, buffers, bias)

    def release(self) -> None:
        """Drop this layer's tensors (after ``fuse`` copied them into a stacked layer)."""
        for name in self._buffer_names:
            setattr(self, name, None)
        self.bias = None

    def kernel_buffers(self) -> dict[str, torch.Tensor]:
        """The kernel's tensors by name (what ``prepare`` returned)."""
        return {name: getattr(self, name) for name in self._buffer_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.kernel.matmul(x.reshape(-1, self.in_features), self.kernel_buffers(), self.shape)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.shape.group_size}" if self.shape.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.shape.scheme}{group}, kernel={self.kernel.name}"
        )
