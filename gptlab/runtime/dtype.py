"""The compute dtype: one spelling of its names on every command, and `auto`, decided here alone.

auto → on CUDA, bf16 where the GPU supports it; on CPU, bf16 only when the CPU has native bf16 matmul
(AMX or avx512_bf16) and a short, cached measurement at the model's matmul shape shows bf16 at least
MIN_SPEEDUP× faster than fp32; otherwise fp32. On an AVX2-only CPU oneDNN has no bf16 kernel and falls
back to a reference path ~100-200× slower than fp32, so bf16 there is never chosen, and asking for it
explicitly prints what it costs.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.nn as nn

from gptlab.errors import GptlabError
from gptlab.runtime.capability import cpu_bf16_native
from gptlab.runtime.matmul import matmul_flops

NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
         "float16": "float16", "fp16": "float16"}
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRAIN_DTYPES = ("auto", "float32", "bfloat16")  # fp16 training would need loss scaling
INFER_DTYPES = ("auto", "float32", "bfloat16", "float16")
MIN_SPEEDUP = 1.2  # bf16 matmuls must win by this much: casts and fp32 softmax/LayerNorm eat part of it
PROBE = (256, 256, 256)  # the shape that shows a CPU's bf16 penalty in well under a second, even at 0.4 GFLOP/s
MAX_ROWS = 4096  # a longer measurement shows nothing new
_said: set[str] = set()


def canonical_dtype(name, allowed: tuple[str, ...] = TRAIN_DTYPES, what: str = "dtype") -> str:
    """'bf16' / 'bfloat16' / torch.bfloat16 → 'bfloat16'; GptlabError for anything not in `allowed`."""
    key = str(name).removeprefix("torch.").lower() if name is not None else "auto"
    canon = NAMES.get(key)
    if canon is None or canon not in allowed:
        raise GptlabError(f"{what} must be one of {' | '.join(allowed)} (or fp32/bf16/fp16), got {name!r}")
    return canon


def dtype_arg(allowed: tuple[str, ...] = INFER_DTYPES):
    """argparse `type=` for --dtype: accepts both spellings, stores the canonical name."""
    def parse(s: str) -> str:
        try:
            return canonical_dtype(s, allowed)
        except GptlabError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "dtype"
    return parse


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _say(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        print(msg, file=sys.stderr, flush=True)


def _gflops(device, dt, shape) -> float:
    return matmul_flops(device, dt, *shape) / 1e9


def _auto_cpu(shape: tuple[int, int, int] | None) -> tuple[torch.dtype, str]:
    native, why = cpu_bf16_native()
    if not native:
        bf, fp = _gflops("cpu", torch.bfloat16, PROBE), _gflops("cpu", torch.float32, PROBE)
        return torch.float32, f"{why}: bf16 matmul {bf:.1f} vs fp32 {fp:.0f} GFLOP/s"
    m, k, n = shape or (2048, 768, 3072)
    shape = (min(m, MAX_ROWS), k, n)
    bf, fp = _gflops("cpu", torch.bfloat16, shape), _gflops("cpu", torch.float32, shape)
    at = "×".join(map(str, shape))
    if bf >= MIN_SPEEDUP * fp:
        return torch.bfloat16, f"{why}: bf16 matmul {bf:.0f} vs fp32 {fp:.0f} GFLOP/s at {at}"
    return torch.float32, f"{why}, but bf16 matmul is only {bf / fp:.2f}× fp32 at {at} ({bf:.0f} vs {fp:.0f} GFLOP/s)"


def _auto(device: torch.device, shape) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} has bf16 tensor cores"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no bf16"
    if device.type == "cpu":
        return _auto_cpu(shape)
    return torch.float32, f"{device.type} runs fp32"


def warn_if_slow(dt: torch.dtype, device: torch.device | str, log: bool = True) -> None:
    """A user asked for bf16 on a CPU without native bf16: honour it, and say what it costs."""
    if dt != torch.bfloat16 or torch.device(device).type != "cpu" or cpu_bf16_native()[0]:
        return
    bf, fp = _gflops("cpu", torch.bfloat16, PROBE), _gflops("cpu", torch.float32, PROBE)
    if log and fp > 1.5 * bf:
        _say(f"warning: bf16 on this CPU is ~{fp / bf:.0f}× slower than fp32 ({cpu_bf16_native()[1]}): "
             "use --dtype float32 or auto")


def resolve_dtype(requested, device: torch.device | str, shape: tuple[int, int, int] | None = None, *,
                  allowed: tuple[str, ...] = INFER_DTYPES, log: bool = True) -> torch.dtype:
    """The torch dtype to compute in. `requested`: a name in either spelling, a torch.dtype or None (auto).
    `shape`: the (rows, in, out) of the model's typical matmul, for the CPU measurement. Prints the choice
    and its reason once per process (`log=False` on non-zero ranks)."""
    device = torch.device(device)
    name = dtype_name(requested) if isinstance(requested, torch.dtype) else canonical_dtype(requested, allowed)
    if name != "auto":
        dt = TORCH[name]
        warn_if_slow(dt, device, log)
        return dt
    dt, why = _auto(device, shape)
    if log:
        _say(f"dtype auto → {dtype_name(dt)} ({why})")
    return dt


def linear_shape(model: nn.Module, rows: int) -> tuple[int, int, int]:
    """(rows, in, out) of the model's most common Linear shape (the blocks' layers; widest on ties)."""
    counts = collections.Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    if not counts:
        return (rows, 768, 3072)
    (k, n), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1]))
    return (rows, k, n)


def autocast(device: torch.device | str, dt: torch.dtype):
    """The autocast context for a compute dtype: on for bf16/fp16, explicitly off for fp32."""
    dev = torch.device(device).type
    if dt in (torch.bfloat16, torch.float16):
        return torch.autocast(dev, dtype=dt)
    return torch.autocast(dev, dtype=torch.bfloat16, enabled=False)
