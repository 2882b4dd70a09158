"""Measured matmul throughput. The dtype `auto` decision and MFU's denominator both come from here, so
MFU is relative to the peak of the dtype in use on this very machine. Measurements are cached per machine
(chip, ISA limits, threads, torch version), dtype and shape in $GPTLAB_CACHE (~/.cache/gptlab)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.fileio import atomic_write_json
from gptlab.runtime.capability import machine_key

CACHE_FILE = "matmul_flops.v2.json"  # the version of how it is measured


def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


def _load_cache() -> dict:
    try:
        return json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _store(key: str, value: float) -> None:
    known = _load_cache()
    known[key] = value
    try:
        atomic_write_json(cache_dir() / CACHE_FILE, known)
    except OSError:  # a read-only home: measure again next time
        pass


STREAM_ROWS = 16  # up to this many rows a matmul is bound by reading the weights: measure it streaming
STREAM_BYTES = 256 << 20  # fp32 weight bytes cycled through, more than a CPU's caches hold


def _time_matmul(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, budget_s: float) -> float:
    """Seconds of the fastest of repeated x (m, k) · W (n, k)ᵀ calls within about budget_s (the fastest
    is the machine's capability; slower ones measure whatever else was running). Decoding-sized inputs
    (m ≤ STREAM_ROWS) cycle through enough weight copies to stream them from memory, as a decode step
    streams a whole model; otherwise one weight is reused, as in a training step's GEMMs."""
    copies = max(1, STREAM_BYTES // (4 * k * n)) if m <= STREAM_ROWS and device.type == "cpu" else 1
    x = torch.full((m, k), 0.5, device=device, dtype=dtype)  # not randn: the training RNG stays untouched
    ws = [torch.full((n, k), 0.25, device=device, dtype=dtype) for _ in range(copies)]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    reps = 4 if device.type == "cuda" else 1

    def run() -> None:
        for w in ws:
            for _ in range(reps):
                F.linear(x, w)

    t = time.perf_counter()
    run()  # warm-up: kernel selection, JIT, page faults
    sync()
    first = time.perf_counter() - t
    if first > budget_s:  # a very slow path (bf16 without a kernel): one pass says enough
        return first / (reps * copies)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        run()
        sync()
        best = min(best, (time.perf_counter() - t) / (reps * copies))
    return best


def matmul_flops(device: torch.device | str, dtype: torch.dtype, m: int, k: int, n: int, budget_s: float = 0.25) -> float:
    """FLOP/s of an (m, k) @ (k, n) matmul in `dtype` on `device`, measured once per machine and cached."""
    device = torch.device(device)
    key = f"{machine_key(device)}|{str(dtype).removeprefix('torch.')}|{m}x{k}x{n}"
    known = _load_cache()
    if key in known:
        return float(known[key])
    flops = 2 * m * k * n / _time_matmul(device, dtype, m, k, n, budget_s)
    _store(key, flops)
    return flops


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float:
    """The best matmul throughput of `dtype` here: square matmuls of growing size, stopping once one call
    gets long (a slow path is not worth a bigger measurement). MFU's denominator."""
    device = torch.device(device)
    sizes = (1024, 2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    best = 0.0
    for s in sizes:
        f = matmul_flops(device, dtype, s, s, s)
        best = max(best, f)
        if 2 * s**3 / f > 0.1:
            break
    return best
