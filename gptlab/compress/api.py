"""Python API of `gptlab compress`: each function reads a run dir and writes a new one that every other
command loads unchanged. The `*_model` functions do the same to an in-memory GPT (tests, benchmarks)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from gptlab.compress.format import check_dense_source, save_compressed
from gptlab.compress.gptq import gptq_quantize
from gptlab.compress.hessian import calibration_windows, check_vocab_fits, iter_block_linears, run_blockwise
from gptlab.compress.prune import magnitude_prune, nm_prune, sparsity_of, structured_prune
from gptlab.compress.quant import Int8Linear, IntNLinear, LLMInt8Linear, rtn_intn
from gptlab.compress.sparsegpt import sparsegpt_prune
from gptlab.errors import GptlabError
from gptlab.run.lock import writes_run_dir

QUANT_METHODS = ("int8", "llm-int8", "rtn", "gptq")
PRUNE_METHODS = ("magnitude", "nm", "structured")


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _load_source(src_run):
    from gptlab.run import load_run

    run = load_run(src_run, device="cpu")
    steps = check_dense_source(run.config, src_run)
    return run, steps


def _calibration(model, data, calib_samples: int, seq_len: int | None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    if data is None:
        raise GptlabError("this method needs calibration data: pass a prepared data dir (--data, `gptlab prepare`)")
    T = seq_len or model.cfg.block_size
    if T > model.cfg.block_size:
        raise GptlabError(f"--seq-len {T} exceeds the model context {model.cfg.block_size}")
    tokens = calibration_windows(data, calib_samples, T, seed)
    check_vocab_fits(tokens, model.cfg.vocab_size, data)
    return tokens, {"data": str(Path(data).resolve()), "calib_samples": calib_samples, "seq_len": T}


def _intn_from_codes(lin: nn.Linear, codes, scales, zeros, bits: int, group_size: int) -> nn.Module:
    if bits == 8:
        m = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        m.weight_int8.copy_(codes)
        m.weight_scale.copy_(scales)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.detach().float())
        return m
    return IntNLinear.from_codes(lin, codes, scales, zeros, bits, group_size)


def _check_bits(method: str, bits: int, group_size: int) -> None:
    if method in ("int8", "llm-int8") and (bits != 8 or group_size):
        raise GptlabError(f"{method} is per-channel 8-bit: use --bits 8 and no --group-size (or --method rtn/gptq)")
    if method in ("rtn", "gptq") and bits not in (2, 3, 4, 8):
        raise GptlabError(f"--bits must be 2, 3, 4 or 8 for {method}, got {bits}")
    if method in ("rtn", "gptq") and bits == 8 and group_size:
        raise GptlabError("8-bit weights are per-channel (the Int8Linear format): drop --group-size")
    if group_size < 0 or (group_size and group_size % 2):
        raise GptlabError(f"--group-size must be 0 (per channel) or a positive even number, got {group_size}")


@torch.no_grad()
def quantize_model(model, method: str = "int8", bits: int = 8, group_size: int = 0, tokens: torch.Tensor | None = None,
                   act_order: bool = False, threshold: float = 6.0, blocksize: int = 128, percdamp: float = 0.01,
                   quiet: bool = True) -> dict:
    """Quantize the block Linear layers of `model` in place (embeddings and the tied head stay dense)."""
    if method not in QUANT_METHODS:
        raise GptlabError(f"unknown quantization method {method!r}; choose from {', '.join(QUANT_METHODS)}")
    _check_bits(method, bits, group_size)
    step = {"method": method, "bits": bits, "group_size": group_size}
    if method == "gptq":
        if tokens is None:
            raise GptlabError("GPTQ needs calibration data (--data)")

        def gptq_layer(name, lin, H):
            r = gptq_quantize(lin.weight, H, bits, group_size, blocksize, percdamp, act_order, what=name)
            return _intn_from_codes(lin, r.codes, r.scales, r.zeros, bits, group_size)

        run_blockwise(model, tokens, gptq_layer, desc=f"gptq {bits}-bit", quiet=quiet)
        step.update(act_order=act_order, percdamp=percdamp, blocksize=blocksize)
        return step
    for name, lin in list(iter_block_linears(model)):
        if method == "llm-int8":
            new = LLMInt8Linear.from_linear(lin, threshold)
        elif method == "int8" or bits == 8:
            new = Int8Linear.from_linear(lin)
        else:
            new = rtn_intn(lin, bits, group_size)
        _swap(model, name, new)
    if method == "llm-int8":
        step["threshold"] = threshold
    return step


@torch.no_grad()
def sparsegpt_model(model, tokens: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, quant_bits: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01, quiet: bool = True) -> dict:
    """One-shot SparseGPT over the blocks of `model`, in place."""
    if quant_bits not in (0, 2, 3, 4, 8):
        raise GptlabError(f"--quant-bits must be 0 (off), 2, 3, 4 or 8, got {quant_bits}")
    if (n or m) and not 0 < n < m:
        raise GptlabError(f"N:M sparsity keeps n of every m weights: need 0 < n < m (e.g. --n 2 --m 4), got {n}:{m}")

    def layer(name, lin, H):
        r = sparsegpt_prune(lin.weight, H, sparsity, n, m, blocksize, percdamp, quant_bits, 0, what=name)
        if r.grid is None:
            lin.weight.copy_(r.weight.to(lin.weight.dtype))
            return None
        return _intn_from_codes(lin, r.grid.codes(r.weight), r.grid.scale[:, 0] if quant_bits == 8 else r.grid.scale,
                                r.grid.zero, quant_bits, 0)

    label = f"{n}:{m}" if m else f"{sparsity:.0%}"
    run_blockwise(model, tokens, layer, desc=f"sparsegpt {label}", quiet=quiet)
    return {"method": "sparsegpt", "sparsity": (1 - n / m) if m else sparsity, "n": n, "m": m,
            "quant_bits": quant_bits, "blocksize": blocksize, "percdamp": percdamp}


# --- run dir in, run dir out -------------------------------------------------------------------------
@writes_run_dir()
def quantize(src_run, out_dir, *, method: str = "int8", bits: int = 8, group_size: int = 0, data=None,
             calib_samples: int = 128, seq_len: int | None = None, act_order: bool = False,
             threshold: float = 6.0, quiet: bool = False) -> Path:
    """INT8 weight-only ('int8'), LLM.int8() ('llm-int8'), round-to-nearest ('rtn') or GPTQ ('gptq')."""
    if method not in QUANT_METHODS:
        raise GptlabError(f"unknown quantization method {method!r}; choose from {', '.join(QUANT_METHODS)}")
    _check_bits(method, bits, group_size)
    run, steps = _load_source(src_run)
    tokens, calib = (None, {})
    if method == "gptq":
        tokens, calib = _calibration(run.model, data, calib_samples, seq_len)
    t0 = time.perf_counter()
    step = quantize_model(run.model, method, bits, group_size, tokens, act_order, threshold, quiet=quiet)
    step.update(calib, seconds=round(time.perf_counter() - t0, 1))
    return save_compressed(run.model, run.tokenizer, out_dir, run.config, src_run, steps + [step])


@writes_run_dir()
def prune(src_run, out_dir, *, method: str = "magnitude", sparsity: float = 0.5, scope: str = "layer", n: int = 0,
          m: int = 0, heads: int = 0, ffn: float = 0.0) -> Path:
    """Magnitude pruning: unstructured ('magnitude', per layer or global), 'nm' (keep n of every m) or
    'structured' (remove `heads` heads and a fraction `ffn` of FFN channels per layer)."""
    if method not in PRUNE_METHODS:
        raise GptlabError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNE_METHODS)}")
    stray = [f"--{k}" for k, v, owner in (("n", n, "nm"), ("m", m, "nm"), ("heads", heads, "structured"),
                                           ("ffn", ffn, "structured")) if v and owner != method]
    if stray:  # e.g. --n 2 --m 4 without --method nm would silently prune by magnitude
        raise GptlabError(f"{' '.join(stray)} do not apply to --method {method}; did you mean --method "
                          f"{'nm' if stray[0] in ('--n', '--m') else 'structured'}?")
    run, steps = _load_source(src_run)
    model = run.model
    if method == "magnitude":
        step = magnitude_prune(model, sparsity, scope)
    elif method == "nm":
        step = nm_prune(model, n, m)
    else:
        model, step = structured_prune(model, heads, ffn)
    if method != "structured":
        step["measured_sparsity"] = round(sparsity_of(model), 6)
    return save_compressed(model, run.tokenizer, out_dir, run.config, src_run, steps + [step])


@writes_run_dir()
def sparsegpt(src_run, out_dir, *, data, sparsity: float = 0.5, n: int = 0, m: int = 0, quant_bits: int = 0,
              calib_samples: int = 128, seq_len: int | None = None, blocksize: int = 128, percdamp: float = 0.01,
              quiet: bool = False) -> Path:
    """One-shot SparseGPT (unstructured `sparsity`, or n:m), optionally with joint `quant_bits` quantization."""
    run, steps = _load_source(src_run)
    tokens, calib = _calibration(run.model, data, calib_samples, seq_len)
    t0 = time.perf_counter()
    step = sparsegpt_model(run.model, tokens, sparsity, n, m, quant_bits, blocksize, percdamp, quiet=quiet)
    step.update(calib, seconds=round(time.perf_counter() - t0, 1), measured_sparsity=round(sparsity_of(run.model), 6))
    return save_compressed(run.model, run.tokenizer, out_dir, run.config, src_run, steps + [step])


def report(run_dirs, *, data, out=None, eval_tokens: int = 65536, decode_tokens: int = 64, seq_len: int | None = None,
           decode_threads: int | None = None, quiet: bool = False) -> list[dict]:
    """Table of method, bits, sparsity, parameters, size on disk, val perplexity and batch-1 decode tokens/s."""
    from gptlab.compress.report import report as _report

    return _report(run_dirs, data=data, out=out, eval_tokens=eval_tokens, decode_tokens=decode_tokens,
                   seq_len=seq_len, decode_threads=decode_threads, quiet=quiet)
