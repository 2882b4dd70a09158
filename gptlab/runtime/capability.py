"""What this machine's CPU can do, read from one overridable source.

`GPTLAB_CPU_BF16=0` makes gptlab behave as on a CPU without native bf16 (an AVX2-only laptop or EPYC),
`GPTLAB_CPU_BF16=1` as on one with it (AMX or avx512_bf16); unset, it is detected. Tests and CI use the
override to exercise both branches on any machine. To make the hardware itself look like AVX2 (oneDNN's
and ATen's kernels included), also set `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2`, as `.ci/run`'s second pass does.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from gptlab.errors import GptlabError

OVERRIDE_ENV = "GPTLAB_CPU_BF16"
ISA_ENVS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", OVERRIDE_ENV)


def _forced() -> bool | None:
    v = os.environ.get(OVERRIDE_ENV, "").strip()
    if v in ("", "auto"):
        return None
    if v not in ("0", "1"):
        raise GptlabError(f"{OVERRIDE_ENV} must be 0, 1 or unset, got {v!r}")
    return v == "1"


def _flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # torch.cpu._is_amx_tile_supported etc. (cpuinfo; absent in old torch)
    try:
        return bool(fn()) if fn else False
    except RuntimeError:
        return False


def onednn_bf16() -> bool:
    """oneDNN has a bf16 kernel here (avx512bw/vl/dq, avx_ne_convert or better): bf16 packing will not raise."""
    forced = _forced()
    if forced is not None:
        return forced
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_units() -> list[str]:
    """The native bf16 matmul units of this CPU, as oneDNN can use them."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return []  # e.g. ONEDNN_MAX_CPU_ISA=AVX2 on any CPU: oneDNN will not use them
    return [n for n, f in (("AMX", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")) if _flag(f)]


def cpu_bf16_native() -> tuple[bool, str]:
    """(whether bf16 matmuls run on native hardware, why) — the first gate of dtype auto on CPU."""
    forced = _forced()
    if forced is not None:
        return forced, f"{OVERRIDE_ENV}={int(forced)}"
    units = bf16_units()
    if units:
        return True, "+".join(units)
    return False, f"CPU has no native bf16 ({cpu_isa()}, no AMX or avx512_bf16)"


def cpu_isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> str:
    """One line for benchmark tables: model, ISA level, native bf16 units, threads."""
    units = bf16_units()
    return (f"{cpu_model()}, {cpu_isa()}{' + ' + ' + '.join(units) if units else ', no native bf16'}, "
            f"{torch.get_num_threads()} threads")


def machine_key(device: torch.device) -> str:
    """What a measured speed depends on: the chip, the kernels torch may use, threads, torch's version."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}|torch {torch.__version__}"
    env = ",".join(f"{k}={os.environ[k]}" for k in ISA_ENVS if os.environ.get(k))
    return f"cpu:{cpu_model()}|{cpu_isa()}|{torch.get_num_threads()}t|torch {torch.__version__}|{env}"
