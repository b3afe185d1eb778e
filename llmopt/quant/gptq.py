"""GPTQ: Hessian-aware rounding with error compensation (Frantar et al., 2022).

For a linear layer ``y = x Wᵀ`` (W: (N, K)) the layer-wise objective is ``‖X Wᵀ − X Qᵀ‖²`` with
calibration inputs X; its Hessian in W's rows is ``H = 2/n Σ x xᵀ`` (K, K), shared by all rows.
Columns are quantized one at a time, left to right; the error of each column, scaled by the
inverse-Hessian Cholesky factor, is pushed onto the columns not yet quantized so they can absorb
it. Updates are applied lazily in blocks of columns (128 by default) to keep the work in
matrix-matrix products.

The output formats are exactly those of :mod:`llmopt.quant.schemes` (``quantize_int8`` /
``quantize_int4``), so GPTQ results can be stored and dequantized the same way:

- int8: per-output-channel scales, chosen before GPTQ from the weights (absmax), rounded to the
  storage dtype; then GPTQ picks the integers.
- int4: per-group scale and zero point from the candidates of ``quantize_int4``'s range search,
  keeping the one with the least Hessian-weighted error ``e H_gg eᵀ`` (H_gg: the group's block).
  Default (``act_order=True``): all groups' parameters are fixed up front from the original
  weights ("static groups") and columns are visited by decreasing Hessian diagonal; the stored
  layout is unchanged (no permutation in the checkpoint), since each column keeps its own
  group's parameters. With ``act_order=False``: natural column order, and each group's
  parameters are chosen when its first column is reached, from the group's *current*
  (error-updated) weights (the reference's ``static_groups=False`` behaviour).
- int8 also defaults to act-order (per-row scales do not depend on column order).

Hessians of all linears are collected at once from the float32 model (not sequentially from a
partly quantized one). Memory: one (K, K) float32 per linear; for smollm2-135m that is
30 × (6 × 576² + 1536²) + 576² floats ≈ 0.52 GB.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from llmopt.quant.schemes import INT4_SEARCH_STEPS, int4_params

Progress = Callable[[str, int, int], None]

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal


class _StopForward(Exception):
    """Raised by the output head's hook: its input is all that is needed from the forward."""


# --------------------------------------------------------------------------------------------
# Calibration: Hessians of every linear's input
# --------------------------------------------------------------------------------------------


def calibration_windows(tokenizer: Any, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` (no special tokens) as (n, seq_len) windows; a
    trailing partial window is dropped (a text shorter than one window is one window)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    if not ids:
        raise ValueError("The calibration text has no tokens.")
    seq_len = min(seq_len, len(ids))
    n_win = len(ids) // seq_len
    return torch.tensor(ids[: n_win * seq_len], dtype=torch.long).view(n_win, seq_len)


@torch.no_grad()
def collect_hessians(
    model: Any,
    tokenizer: Any,
    text: str,
    n_tokens: int = 8192,
    seq_len: int = 512,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Module name → ``H = 2/n Σ x xᵀ`` (K, K) float32 over the calibration tokens, for every
    ``nn.Linear`` of ``model`` (lm_head included), from the unquantized model in one pass."""
    say = progress or (lambda *_: None)
    windows = calibration_windows(tokenizer, text, n_tokens, seq_len)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # Linears fed the very same tensor (q/k/v, gate/up) share one x xᵀ product per call.
    last: list[Any] = [None, None, 0]
    head = model.get_output_embeddings()

    def make_hook(name: str, k: int, is_head: bool):
        def hook(_module: nn.Module, args: tuple) -> None:
            x_in = args[0]
            if x_in is not last[0]:
                x = x_in.detach().reshape(-1, k).float()
                last[0], last[1], last[2] = x_in, x.t() @ x, x.shape[0]
            if name not in sums:
                sums[name] = torch.zeros(k, k, dtype=torch.float32)
                counts[name] = 0
            sums[name].add_(last[1].to(sums[name].device))
            counts[name] += last[2]
            if is_head:  # the output head is the last module of the forward: skip its matmul
                raise _StopForward

        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                handles.append(
                    module.register_forward_pre_hook(make_hook(name, module.in_features, module is head))
                )
        device = next(model.parameters()).device
        for i, window in enumerate(windows):
            with contextlib.suppress(_StopForward):
                model(window.unsqueeze(0).to(device), use_cache=False)
            last[0] = last[1] = None
            say("calibrating", i + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
    return {name: total.mul_(2.0 / counts[name]) for name, total in sums.items()}


# --------------------------------------------------------------------------------------------
# Core: inverse-Hessian Cholesky factor
# --------------------------------------------------------------------------------------------


def _prepare(
    weight: torch.Tensor, H: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wᵀ float32 (K, N) with dead columns zeroed, upper Cholesky factor U of H⁻¹ (K, K) float32,
    dead-column mask). Dampening is raised if the factorization fails."""
    W = weight.detach().float().t().contiguous()  # (K, N)
    H = H.detach().to(torch.float64).clone()
    k = H.shape[0]
    if H.shape != (k, k) or W.shape[0] != k:
        raise ValueError(f"Hessian {tuple(H.shape)} does not match weight {tuple(weight.shape)}.")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(k, dtype=torch.float64, device=H.device)
    for attempt in range(6):
        Hd = H + (damp * (10**attempt)) * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return W, U.float(), dead
    raise RuntimeError("GPTQ: the Hessian could not be factorized even with heavy dampening.")


def _gptq_loop(
    Wt: torch.Tensor,
    U: torch.Tensor,
    block_size: int,
    quant_col: Callable[[torch.Tensor, int], torch.Tensor],
    group_start: Callable[[torch.Tensor, int], None] | None = None,
    group_size: int | None = None,
    perm: torch.Tensor | None = None,
) -> None:
    """Run GPTQ in place over ``Wt`` = Wᵀ (K, N) (transposed so that a weight column is a
    contiguous row), column by column in the order of ``perm`` (default 0..K-1; Wt and U must
    already be permuted when ``perm`` is given). ``quant_col(w, j)`` quantizes the current column
    ``w`` (N,) whose original index is ``j``, records its codes, and returns its dequantized
    value. ``group_start(Wg, g)`` (only without ``perm``) is called when column ``g * group_size``
    is reached, with that group's current (error-updated) weights as (N, G)."""
    k = Wt.shape[0]
    order = perm.tolist() if perm is not None else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()  # (B, N)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_start is not None and group_size is not None and col % group_size == 0:
                # The block is a multiple of the group size, so W1 holds the fully updated group.
                group_start(W1[i : i + group_size].t(), col // group_size)
            w = W1[i]
            dq = quant_col(w, order[col] if order is not None else col)
            err = Err1[i]
            torch.sub(w, dq, out=err).div_(U1[i, i])
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
        if i2 < k:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1.0)


# --------------------------------------------------------------------------------------------
# int8: per-output-channel symmetric
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def gptq_quantize_int8(
    weight: torch.Tensor,
    H: torch.Tensor,
    scale_dtype: torch.dtype,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for per-output-channel symmetric int8. Same return format as ``quantize_int8``:
    (q int8 (N, K) in [-127, 127], scale (N, 1) in ``scale_dtype``). The scales are those of
    ``quantize_int8`` (absmax / 127), fixed before GPTQ picks the integers. ``act_order`` visits
    columns by decreasing Hessian diagonal (the stored layout is unchanged)."""
    H = H.to(weight.device)  # GPTQ runs where the weight is (the GPU, when the model is there)
    scale = (weight.detach().float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-10).to(scale_dtype)
    s = scale.float().reshape(-1)
    n, k = weight.shape
    Qt = torch.zeros(k, n, dtype=torch.int8, device=weight.device)

    def quant_col(w: torch.Tensor, j: int) -> torch.Tensor:
        q = torch.round(w / s).clamp_(-127, 127)
        Qt[j] = q.to(torch.int8)
        return q * s

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, U, _dead = _prepare(weight[:, perm], H[perm][:, perm], damp)
    else:
        W, U, _dead = _prepare(weight, H, damp)
    _gptq_loop(W, U, block_size, quant_col, perm=perm)
    return Qt.t().contiguous(), scale


# --------------------------------------------------------------------------------------------
# int4: group-wise asymmetric with integer zero points
# --------------------------------------------------------------------------------------------


def _int4_group_params(
    Wg: torch.Tensor, Hg: torch.Tensor | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (N,) scale_dtype, zero point (N,) float) for one group of weights Wg (N, G).

    The candidates are those of ``quantize_int4`` (the range [min, max] shrunk towards 0 in
    ``INT4_SEARCH_STEPS`` steps to 55%); the kept one has the least error ``e Hg eᵀ`` per row,
    with Hg the group's (G, G) block of the Hessian (None: plain squared error)."""
    lo_full = Wg.amin(dim=1).clamp(max=0)
    hi_full = Wg.amax(dim=1).clamp(min=0)
    best_err = torch.full(lo_full.shape, float("inf"), device=Wg.device)
    best_scale = torch.zeros(lo_full.shape, dtype=scale_dtype, device=Wg.device)
    best_zp = torch.zeros(lo_full.shape, device=Wg.device)
    for step in range(INT4_SEARCH_STEPS):
        shrink = 1.0 - 0.45 * step / max(INT4_SEARCH_STEPS - 1, 1)
        scale, zp = int4_params(lo_full * shrink, hi_full * shrink, scale_dtype)
        sf = scale.float().unsqueeze(1)
        q = (torch.round(Wg / sf) + zp.unsqueeze(1)).clamp_(-8, 7)
        e = (q - zp.unsqueeze(1)) * sf - Wg
        err = ((e @ Hg) * e).sum(dim=1) if Hg is not None else e.square().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _group_hessian(H: torch.Tensor, lo: int, hi: int, search: str) -> torch.Tensor | None:
    if search == "hessian":
        return H[lo:hi, lo:hi].float()
    if search == "diag":
        return torch.diag(torch.diag(H)[lo:hi].float())
    if search == "mse":
        return None
    raise ValueError(f"Unknown int4 range search '{search}'. Use 'hessian', 'diag' or 'mse'.")


@torch.no_grad()
def gptq_quantize_int4(
    weight: torch.Tensor,
    H: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    search: str = "hessian",
    act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for group-wise asymmetric int4. Same return format as ``quantize_int4``:
    (q int8 in [-8, 7] (N, K), scale (N, K/G) in ``scale_dtype``, zero_point int8 (N, K/G)).

    Each group's scale/zero point is the candidate of ``quantize_int4``'s shrinking-range search
    with the least error as measured by ``search``: "hessian" (``e H_gg eᵀ``, H_gg the group's
    block of H), "diag" (diagonal of H only) or "mse" (unweighted). With ``act_order`` (default)
    the groups' parameters are chosen up front from the original weights and the columns are
    visited by decreasing Hessian diagonal; without it, in natural order, each group's
    parameters come from its current (error-updated) weights when its first column is reached.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"Group size {group_size} does not divide the input width {k}.")
    # Blocks must hold whole groups so that a group's current weights are all in the block.
    if block_size % group_size and group_size % block_size:
        raise ValueError(f"Block size {block_size} and group size {group_size} must divide one another.")
    block_size = max(block_size, group_size)
    n_groups = k // group_size
    H = H.to(weight.device)  # GPTQ runs where the weight is (the GPU, when the model is there)
    dev = weight.device
    Qt = torch.zeros(k, n, dtype=torch.int8, device=dev)
    scales = torch.zeros(n, n_groups, dtype=scale_dtype, device=dev)
    zps = torch.zeros(n, n_groups, dtype=torch.int8, device=dev)
    scales_f = torch.zeros(n, n_groups, device=dev)
    zps_f = torch.zeros(n, n_groups, device=dev)

    def quant_col(w: torch.Tensor, j: int) -> torch.Tensor:
        g = j // group_size
        s, z = scales_f[:, g], zps_f[:, g]
        q = (torch.round(w / s) + z).clamp_(-8, 7)
        Qt[j] = q.to(torch.int8)
        return (q - z) * s

    if not act_order:
        W, U, _dead = _prepare(weight, H, damp)

        def group_start(Wg: torch.Tensor, g: int) -> None:
            lo = g * group_size
            s, z = _int4_group_params(Wg, _group_hessian(H, lo, lo + group_size, search), scale_dtype)
            scales[:, g] = s
            zps[:, g] = z.to(torch.int8)
            scales_f[:, g] = s.float()
            zps_f[:, g] = z

        _gptq_loop(W, U, block_size, quant_col, group_start=group_start, group_size=group_size)
    else:
        w0 = weight.detach().float()
        for g in range(n_groups):
            lo = g * group_size
            s, z = _int4_group_params(
                w0[:, lo : lo + group_size], _group_hessian(H, lo, lo + group_size, search), scale_dtype
            )
            scales[:, g] = s
            zps[:, g] = z.to(torch.int8)
            scales_f[:, g] = s.float()
            zps_f[:, g] = z
        perm = torch.argsort(torch.diag(H), descending=True)
        W, U, _dead = _prepare(weight[:, perm], H[perm][:, perm], damp)
        _gptq_loop(W, U, block_size, quant_col, perm=perm)
    return Qt.t().contiguous(), scales, zps


__all__ = ["collect_hessians", "gptq_quantize_int4", "gptq_quantize_int8"]
