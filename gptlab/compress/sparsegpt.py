"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning by approximate layer-wise reconstruction.

Per layer, with H = 2XXᵀ of its calibration inputs and U the upper Cholesky factor of (H + λI)⁻¹:
sweep column blocks of `blocksize`; inside a block choose the mask adaptively by the OBS saliency
w² / [H⁻¹]²_jj (unstructured: the block's smallest `sparsity` fraction; N:M: the M-N smallest of every M
consecutive inputs of a row), zero the pruned weights and push each column's error onto the remaining
columns of the block (OBS update), then onto all later columns at once (lazy batch update). Optionally
the kept weights are quantized in the same sweep (joint sparsity + quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptlab.compress.gptq import Grid
from gptlab.compress.hessian import inverse_cholesky, prepare_hessian
from gptlab.compress.prune import smallest_mask
from gptlab.errors import GptlabError


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in) pruned (and, with a grid, quantized) weights
    grid: Grid | None
    damp: float


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01, quant_bits: int = 0, group_size: int = 0,
                    what: str = "layer") -> SparseGPTResult:
    """W (out, in), H (in, in). n:m keeps n of every m consecutive weights of a row (2:4 = 50%)."""
    if m:
        if not 0 < n < m or W.size(1) % m:
            raise GptlabError(f"N:M sparsity needs 0 < n < m and m dividing {W.size(1)} input columns, got {n}:{m}")
        if blocksize % m:
            raise GptlabError(f"blocksize {blocksize} must be a multiple of m = {m}")
    elif not 0.0 <= sparsity < 1.0:
        raise GptlabError(f"sparsity must be in [0, 1), got {sparsity}")
    W, H = prepare_hessian(W, H)
    rows, cols = W.shape
    grid = Grid(W, quant_bits, group_size) if quant_bits else None
    Hinv, damp = inverse_cholesky(H, percdamp, what=what)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)  # (count,)
        if m:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # adaptive mask for the whole block, chosen on the weights as updated so far
            mask1 = smallest_mask(W1 ** 2 / d[None, :] ** 2, int(W1.numel() * sparsity))
        for i in range(count):
            w = W1[:, i]
            if m and i % m == 0:  # N:M: the m - n least salient of these m columns, per row
                score = W1[:, i:i + m] ** 2 / d[i:i + m][None, :] ** 2
                mask1[:, i:i + m] = smallest_mask(score, m - n, dim=1)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            if grid is not None:
                q = torch.where(mask1[:, i], q, grid.quantize(q, i1 + i))
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # OBS update within the block
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update
    return SparseGPTResult(W, grid, damp)
