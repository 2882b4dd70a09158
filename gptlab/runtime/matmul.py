"""Measured matmul throughput. The dtype `auto` decision and MFU's denominator both come from here, so
MFU is relative to the peak of the dtype in use on this very machine. Measurements are cached per machine
(chip, ISA limits, threads, torch version), dtype and shape in $GPTLAB_CACHE (~/.cache/gptlab)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from gptlab.fileio import atomic_write_json
from gptlab.runtime.capability import machine_key

CACHE_FILE = "matmul_flops.json"


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


def _time_matmul(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, budget_s: float) -> float:
    """Seconds of the fastest of repeated (m, k) @ (k, n) calls within about budget_s. The fastest call is
    the machine's capability; slower ones measure whatever else was running."""
    a = torch.full((m, k), 0.5, device=device, dtype=dtype)  # not randn: the training RNG stays untouched
    b = torch.full((k, n), 0.25, device=device, dtype=dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    a @ b  # warm-up: kernel selection, JIT, page faults
    sync()
    first = time.perf_counter() - t
    if first > budget_s:  # a very slow path (bf16 without a kernel): one call says enough
        return first
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / (4 if device.type == "cuda" else 1))
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
