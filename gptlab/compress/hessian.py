"""The machinery SparseGPT and GPTQ share: calibration windows, block-by-block inputs, H = 2XXᵀ, and the
dampened Cholesky inverse.

One-shot compression walks the blocks in order. Block i's inputs are produced by blocks 0..i-1 *after*
they were compressed, so each layer's reconstruction corrects for the error already made upstream.
Only one block's activations (N, T, C) are held at a time.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Iterator

import torch
import torch.nn as nn

from gptlab.errors import GptlabError

# the Linear layers of a block, in forward order (what one-shot methods compress)
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def calibration_windows(data_dir, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token windows drawn at random from the train split (as the reference code
    draws 128 × 2048-token C4 segments)."""
    from gptlab.data.loader import TokenData

    if n_samples < 1 or seq_len < 1:
        raise GptlabError(f"calibration needs ≥ 1 sample of ≥ 1 token, got {n_samples} × {seq_len}")
    data = TokenData(data_dir)
    starts = data.window_starts(0, n_samples, seq_len, seed, "train")
    x, _ = data.windows(starts, seq_len, "train")
    return torch.from_numpy(x)


def check_vocab_fits(tokens: torch.Tensor, vocab_size: int, data_dir) -> None:
    if int(tokens.max()) >= vocab_size:
        raise GptlabError(f"{data_dir}: token ids up to {int(tokens.max())} do not fit the model's vocabulary of "
                          f"{vocab_size} (data prepared with another tokenizer?)")


class HessianAccumulator:
    """Running H = (2/n) Σ x xᵀ over the n input rows a Linear has seen (fp32, (in, in))."""

    def __init__(self, cols: int, device="cpu"):
        self.H = torch.zeros(cols, cols, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()  # (rows, in)
        m = x.size(0)
        self.H *= self.n / (self.n + m)  # keep H a mean, so dampening is relative to its scale
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


def inverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6,
                     what: str = "layer") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H). If H + λI is not positive
    definite (e.g. too few calibration tokens for the width), λ is raised 10× and retried, with a warning
    that says so; after max_tries a GptlabError. Returns (U, the λ fraction used)."""
    H = H.clone()
    mean_diag = torch.mean(torch.diag(H)).item()
    if not mean_diag > 0:
        raise GptlabError(f"{what}: the calibration inputs are all zero (empty Hessian); use other calibration data")
    damp = percdamp
    for attempt in range(max_tries):
        Hd = H + damp * mean_diag * torch.eye(H.size(0), dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(f"{what}: Cholesky failed at dampening {percdamp:g}; succeeded at {damp:g} "
                                  "(more calibration samples help)", stacklevel=2)
                return U, damp
        damp *= 10
    raise GptlabError(f"{what}: Hessian not positive definite even with dampening {damp / 10:g} × mean diagonal; "
                      "use more calibration samples or a larger --percdamp")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (never non-zero in calibration) get H_jj = 1 and zero weight, as in the reference code."""
    H, W = H.clone(), W.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def _progress(it, total: int, desc: str, quiet: bool):
    if quiet:
        return it
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, unit="block", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return it


@torch.no_grad()
def run_blockwise(model, tokens: torch.Tensor, compress_layer: Callable[[str, nn.Linear, torch.Tensor], nn.Module | None],
                  batch_size: int = 8, desc: str = "compress", quiet: bool = False) -> None:
    """For each block in order: record H of its Linear inputs (one forward over the calibration windows,
    whose inputs already went through the compressed earlier blocks), let `compress_layer(name, linear, H)`
    compress each Linear in place (or return a replacement module), then run the compressed block to make
    the next block's inputs. Memory: one block's activations (N, T, C) at a time."""
    model.eval()
    dev = model.wte.weight.device
    tokens = tokens.to(dev)
    N, T = tokens.shape
    pos = torch.arange(T, device=dev)
    xs = [model.drop(model.wte(tokens[i:i + batch_size]) + model.wpe(pos)) for i in range(0, N, batch_size)]
    for li in _progress(range(len(model.h)), len(model.h), desc, quiet):
        block = model.h[li]
        linears = {name: block.get_submodule(name) for name in BLOCK_LINEARS}
        acc = {name: HessianAccumulator(lin.in_features, dev) for name, lin in linears.items()}
        hooks = [lin.register_forward_hook(lambda m, inp, out, a=acc[name]: a.add(inp[0]))
                 for name, lin in linears.items()]
        try:
            for x in xs:
                block(x)
        finally:
            for h in hooks:
                h.remove()
        for name, lin in linears.items():
            new = compress_layer(f"h.{li}.{name}", lin, acc[name].H)
            if new is not None:
                parent, attr = name.rsplit(".", 1)
                setattr(block.get_submodule(parent), attr, new)
            acc[name].H = None  # free (in, in) before the next layer
        xs = [block(x) for x in xs]  # the compressed block feeds the next


def iter_block_linears(model) -> Iterator[tuple[str, nn.Linear]]:
    for li, block in enumerate(model.h):
        for name in BLOCK_LINEARS:
            yield f"h.{li}.{name}", block.get_submodule(name)
