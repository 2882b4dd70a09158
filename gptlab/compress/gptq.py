"""GPTQ (Frantar et al. 2023): quantize a layer's weights column by column, each rounding error spread
over the not-yet-quantized columns through the inverse Hessian (Optimal Brain Quantization), in column
blocks with lazy batch updates, the inverse's upper Cholesky factor standing in for the sequential
inverses. Shares H = 2XXᵀ and the dampened Cholesky inverse with SparseGPT (hessian.py).

Quantization grid: asymmetric min/max per output channel, or per group of `group_size` input columns.
Groups are fitted when the sweep reaches them (to the weights as updated by earlier blocks, as the
reference does); with act-order they are fixed before the sweep (the reference's "static groups"), so
codes stay in the original column order. 8 bits uses the symmetric per-channel grid of
Int8Linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.compress.hessian import inverse_cholesky, prepare_hessian
from gptlab.compress.quant import absmax_scale, group_params


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) quantized-then-dequantized weights (on the grid)
    codes: torch.Tensor  # (out, in) integer codes (int8 for 8 bits, [0, 2^bits) otherwise)
    scales: torch.Tensor  # (out,) for 8 bits, (out, G) otherwise
    zeros: torch.Tensor | None  # (out, G) zero points (asymmetric grids)
    damp: float  # the dampening fraction that made H positive definite


class Grid:
    """Per-(row, group) quantization grid of a weight matrix, fixed before the sweep."""

    def __init__(self, W: torch.Tensor, bits: int, group_size: int):
        self.bits, self.cols = bits, W.size(1)
        self.g = group_size or self.cols
        if bits == 8:  # symmetric per channel, the Int8Linear format
            self.scale, self.zero = absmax_scale(W, 8)[:, None], None
        else:
            self.scale, self.zero = group_params(W, bits, group_size)

    def refit_group(self, k: int, w: torch.Tensor) -> None:
        """Re-fit group k's grid to its columns as updated so far (the reference's non-static groups)."""
        from gptlab.compress.quant import minmax_params

        self.scale[:, k], self.zero[:, k] = minmax_params(w, self.bits)

    def params(self, col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.zero is None:
            return self.scale[:, 0], None
        k = col // self.g
        return self.scale[:, k], self.zero[:, k]

    def quantize(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Round column `col` (out,) to the grid; returns dequantized values."""
        s, z = self.params(col)
        if z is None:
            return torch.clamp(torch.round(w / s), -127, 127) * s
        return s * (torch.clamp(torch.round(w / s) + z, 0, 2 ** self.bits - 1) - z)

    def codes(self, Q: torch.Tensor) -> torch.Tensor:
        """Integer codes of on-grid weights (exact: Q/s lands on integers)."""
        if self.zero is None:
            return torch.clamp(torch.round(Q / self.scale), -127, 127).to(torch.int8)
        s = self.scale.repeat_interleave(self.g, dim=1)
        z = self.zero.repeat_interleave(self.g, dim=1)
        return torch.clamp(torch.round(Q / s) + z, 0, 2 ** self.bits - 1).to(torch.uint8)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 0, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, what: str = "layer") -> GPTQResult:
    """Quantize W (out, in) given H (in, in) of its inputs; minimizes ‖(W - Ŵ)X‖² greedily."""
    W, H = prepare_hessian(W, H)
    grid = Grid(W, bits, group_size)
    rows, cols = W.shape
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = inverse_cholesky(H, percdamp, what=what)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if group_size and not act_order and (i1 + i) % group_size == 0:
                grid.refit_group((i1 + i) // group_size, W[:, i1 + i:i1 + i + group_size])
            q = grid.quantize(w, int(perm[i1 + i]))  # the grid of the column's original position
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update of this block's remaining columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of all later columns
    Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q, grid.codes(Q), grid.scale[:, 0] if bits == 8 else grid.scale, grid.zero, damp)
