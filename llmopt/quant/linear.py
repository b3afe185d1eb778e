"""QuantLinear: a linear layer that holds only low-bit weights and scales (no 16-bit copy)."""

from __future__ import annotations

import torch
from torch import nn

from llmopt.quant import norm_fusion
from llmopt.quant.kernels import LayerShape, QuantKernel, select_kernel, stack_channels


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
        self._fused_rows = 0  # fused_norm_rows' answer, once asked
        self._gated_rows = 0  # gated_rows' answer, once asked

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
    def fuse(cls, layers: list[QuantLinear], interleave: bool = False) -> QuantLinear | None:
        """One QuantLinear computing several layers over the same input (outputs side by side, or with
        ``interleave`` alternating channel by channel: ``kernels.stack_channels``), or None when they differ
        in scheme, group or kernel (or in size, to interleave), or the kernel's layout does not stack."""
        first = layers[0]
        same = all(
            layer.kernel is first.kernel
            and (layer.shape.scheme, layer.in_features, layer.shape.group_size)
            == (first.shape.scheme, first.in_features, first.shape.group_size)
            for layer in layers
        )
        if not same or (interleave and len({layer.out_features for layer in layers}) > 1):
            return None
        buffers = first.kernel.concat([layer.kernel_buffers() for layer in layers], interleave=interleave)
        if buffers is None:
            return None
        bias = None
        present = [layer.bias for layer in layers if layer.bias is not None]
        if present:
            bias = stack_channels([
                layer.bias.detach() if layer.bias is not None else present[0].new_zeros(layer.out_features)
                for layer in layers
            ], 0, interleave)  # fmt: skip
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

    # The norm and residual folded in (llmopt/quant/norm_fusion.py): fused by the kernel up to
    # ``fused_norm_rows`` rows, the same arithmetic around the plain matmul past them.

    def fused_norm_rows(self, dtype: torch.dtype, residual: bool = False) -> int:
        """Up to how many rows of ``dtype`` activations this layer folds a norm in (``residual``: as the
        matmul that ends a residual branch, which a bias would come after; it then keeps a ticket
        counter for the kernel). Read once, when the model is built, and kept: it looks at the weight's
        address, which torch.compile cannot."""
        rows = 0
        if not (residual and self.bias is not None):
            rows = self.kernel.fused_norm_rows(self.kernel_buffers(), self.shape, dtype)
        self._fused_rows = rows
        if residual and rows:
            device = next(iter(self.kernel_buffers().values())).device
            self.register_buffer("fusion_counter", norm_fusion.new_counter(device), persistent=False)
        return rows

    def forward_normed(self, x: torch.Tensor, sumsq: torch.Tensor, eps: float) -> torch.Tensor:
        """This layer over ``norm(h)``, from ``norm_fusion.norm_inputs(h, w)``'s ``(x, sumsq)``."""
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        buffers, shape = self.kernel_buffers(), self.shape
        if x2.shape[0] <= self._fused_rows:
            y = self.kernel.matmul_normed(x2, buffers, shape, sumsq, eps)
        else:
            y = QuantKernel.matmul_normed(self.kernel, x2, buffers, shape, sumsq, eps)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def gated_rows(self, dtype: torch.dtype) -> int:
        """Up to how many rows of ``dtype`` activations ``forward_gated`` computes the SiLU product inside the
        kernel (a layer of interleaved gate/up channels, no bias; unless LLMOPT_FUSED_SILU=0). Read once, when
        the model is built, and kept (as ``fused_norm_rows``)."""
        rows = 0
        if self.bias is None and norm_fusion.silu_enabled():
            rows = self.kernel.gated_rows(self.kernel_buffers(), self.shape, dtype)
        self._gated_rows = rows
        return rows

    def forward_gated(
        self, x: torch.Tensor, sumsq: torch.Tensor | None = None, eps: float = 0.0
    ) -> torch.Tensor:
        """``silu(gate) * up`` of this layer of interleaved gate/up channels (``norm_fusion.silu_product``),
        over x or, given ``sumsq``, over ``norm(h)`` (x = h * w, as ``forward_normed``). In the kernel up to
        ``gated_rows`` rows (and, with a norm, ``fused_norm_rows``), the same arithmetic past them."""
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if rows <= self._gated_rows and (sumsq is None or rows <= self._fused_rows):
            y = self.kernel.matmul_gated(x2, self.kernel_buffers(), self.shape, sumsq, eps)
        else:
            y = norm_fusion.silu_product(self(x2) if sumsq is None else self.forward_normed(x2, sumsq, eps))
        return y.reshape(*lead, self.out_features // 2)

    def forward_residual(
        self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``h = residual + self(x)`` and, given the next norm's weight, that norm's fused inputs:
        ``(h, h * w, sumsq)`` (h and h * w shaped as residual), else ``(h, None, None)``. Fused by the
        kernel up to ``fused_norm_rows(residual=True)`` rows (never with a bias, which comes first)."""
        x2 = x.reshape(-1, self.in_features)
        counter = self._buffers.get("fusion_counter")  # there when asked as a residual matmul, without a bias
        if counter is not None and x2.shape[0] <= self._fused_rows:
            buffers, shape = self.kernel_buffers(), self.shape
            h, weighted, sumsq = self.kernel.matmul_residual(
                x2, buffers, shape, residual, norm_weight, counter
            )
        else:
            h, weighted, sumsq = norm_fusion.add_residual(self(x2), residual, norm_weight)
        h = h.view(residual.shape)
        return h, None if weighted is None else weighted.view(residual.shape), sumsq

    def extra_repr(self) -> str:
        group = f", group_size={self.shape.group_size}" if self.shape.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.shape.scheme}{group}, kernel={self.kernel.name}"
        )
