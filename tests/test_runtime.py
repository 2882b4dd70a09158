"""The compute dtype by hardware capability: both CPU branches are exercised on any machine through the
one override (GPTLAB_CPU_BF16) and a faked measurement; `.ci/run` runs this file again with the CPU's
kernels limited to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gptlab.runtime.dtype as rdt
import gptlab.runtime.matmul as rmm
from gptlab.errors import GptlabError
from gptlab.runtime import (autocast, canonical_dtype, cpu_bf16_native, linear_shape, matmul_flops, onednn_bf16,
                            peak_flops, resolve_dtype)
from gptlab.runtime.capability import OVERRIDE_ENV


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rdt, "_said", set())  # each test sees its own messages


def _fake_speeds(monkeypatch, bf16: float, fp32: float) -> list:
    """Replace the measurement: bf16/fp32 GFLOP/s at every shape. Returns the list of measured calls."""
    calls = []

    def fake(device, dtype, m, k, n, budget_s=0.25):
        calls.append((dtype, m, k, n))
        return 1e9 * (bf16 if dtype == torch.bfloat16 else fp32)

    monkeypatch.setattr(rdt, "matmul_flops", fake)
    return calls


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())


def test_dtype_names_have_one_spelling():
    assert canonical_dtype("bf16") == canonical_dtype("BFloat16") == canonical_dtype(torch.bfloat16) == "bfloat16"
    assert canonical_dtype("fp32") == canonical_dtype("float32") == "float32"
    assert canonical_dtype(None) == "auto"
    assert canonical_dtype("fp16", ("auto", "float16")) == "float16"
    for bad, allowed in (("int8", ("auto", "float32")), ("fp16", ("auto", "float32", "bfloat16"))):
        with pytest.raises(GptlabError, match="must be one of"):
            canonical_dtype(bad, allowed)
    from gptlab.train.config import TrainConfig

    assert TrainConfig().dtype == "auto" and TrainConfig(dtype="bf16").dtype == "bfloat16"
    with pytest.raises(GptlabError, match="train.dtype"):
        TrainConfig(dtype="fp16")


def test_native_detection_matches_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    native, why = cpu_bf16_native()
    onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # False under ONEDNN_MAX_CPU_ISA=AVX2
    flags = _cpu_flags()
    assert native == (onednn and bool({"amx_tile", "avx512_bf16"} & flags)), why
    assert onednn_bf16() == onednn


def test_override_forces_either_branch(monkeypatch):
    monkeypatch.setenv(OVERRIDE_ENV, "0")
    assert cpu_bf16_native() == (False, f"{OVERRIDE_ENV}=0") and not onednn_bf16()
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    assert cpu_bf16_native()[0] and onednn_bf16()
    monkeypatch.setenv(OVERRIDE_ENV, "yes")
    with pytest.raises(GptlabError, match=OVERRIDE_ENV):
        cpu_bf16_native()


def test_auto_is_fp32_without_native_bf16_and_says_why(monkeypatch, capsys):
    monkeypatch.setenv(OVERRIDE_ENV, "0")
    calls = _fake_speeds(monkeypatch, bf16=0.4, fp32=75)
    assert resolve_dtype("auto", "cpu", (3072, 256, 1024)) == torch.float32
    err = capsys.readouterr().err
    assert err == f"dtype auto → float32 ({OVERRIDE_ENV}=0: bf16 matmul 0.4 vs fp32 75 GFLOP/s)\n"
    assert {c[1:] for c in calls} == {rdt.PROBE}  # never a big bf16 measurement on a CPU without bf16
    resolve_dtype("auto", "cpu", (3072, 256, 1024))
    assert capsys.readouterr().err == ""  # said once per process


def test_auto_with_native_bf16_follows_the_measurement(monkeypatch, capsys):
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    calls = _fake_speeds(monkeypatch, bf16=900, fp32=200)
    assert resolve_dtype("auto", "cpu", (99999, 768, 3072)) == torch.bfloat16
    assert (torch.bfloat16, rdt.MAX_ROWS, 768, 3072) in calls  # the model's shape, rows capped
    assert "bf16 matmul 900 vs fp32 200 GFLOP/s at 4096×768×3072" in capsys.readouterr().err
    _fake_speeds(monkeypatch, bf16=220, fp32=200)  # native, but not faster at this shape (1.1× < MIN_SPEEDUP)
    assert resolve_dtype("auto", "cpu", (1, 32, 128)) == torch.float32
    assert "only 1.10× fp32" in capsys.readouterr().err


def test_explicit_bf16_is_honoured_with_a_warning_where_slow(monkeypatch, capsys):
    monkeypatch.setenv(OVERRIDE_ENV, "0")
    _fake_speeds(monkeypatch, bf16=0.4, fp32=75)
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.startswith("warning: bf16 on this CPU is ~188× slower than fp32") and "use --dtype float32 or auto" in err
    assert resolve_dtype("float32", "cpu") == torch.float32 and capsys.readouterr().err == ""
    monkeypatch.setenv(OVERRIDE_ENV, "1")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and capsys.readouterr().err == ""


def test_measurements_are_cached_per_machine_and_isa(monkeypatch):
    n = {"calls": 0}

    def timed(device, dtype, m, k, n_, budget_s):
        n["calls"] += 1
        return 1e-3

    monkeypatch.setattr(rmm, "_time_matmul", timed)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert matmul_flops("cpu", torch.float32, 10, 20, 30) == pytest.approx(2 * 10 * 20 * 30 / 1e-3)
    matmul_flops("cpu", torch.float32, 10, 20, 30)
    assert n["calls"] == 1
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another kernel set: measured again
    matmul_flops("cpu", torch.float32, 10, 20, 30)
    assert n["calls"] == 2
    cache = json.loads((rmm.cache_dir() / rmm.CACHE_FILE).read_text())
    assert len(cache) == 2 and all("|float32|10x20x30" in k for k in cache)


def test_peak_is_the_best_square_matmul_and_stops_on_a_slow_path(monkeypatch):
    speeds = {256: 50e9, 512: 80e9, 1024: 70e9, 2048: 60e9}
    seen = []

    def fake(device, dtype, m, k, n, budget_s=0.25):
        seen.append(m)
        return speeds[m]

    monkeypatch.setattr(rmm, "matmul_flops", fake)
    assert peak_flops("cpu", torch.float32) == 80e9 and seen == [256, 512, 1024, 2048]
    seen.clear()
    speeds[256] = 0.3e9  # 2·256³ / 0.3e9 > 0.1 s: bf16 without a kernel; no bigger measurement
    speeds[512] = 0.3e9
    assert peak_flops("cpu", torch.bfloat16) == 0.3e9 and seen == [256]


def test_real_measurement_is_positive_and_leaves_the_rng_alone():
    state = torch.get_rng_state()
    f = matmul_flops("cpu", torch.float32, 64, 64, 64, budget_s=0.02)
    assert f > 1e6 and torch.equal(torch.get_rng_state(), state)


def test_trainer_divides_by_the_peak_of_the_dtype_in_use(monkeypatch, tmp_path):
    import gptlab.train.engine as eng
    from gptlab.model import GPT, preset
    from gptlab.train.config import TrainConfig

    monkeypatch.setenv(OVERRIDE_ENV, "0")
    _fake_speeds(monkeypatch, bf16=0.4, fp32=75)
    asked = []
    monkeypatch.setattr(eng, "peak_flops", lambda device, dt: asked.append(dt) or 1e12)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=32))
    cfg = TrainConfig(max_iters=2, batch_size=2, block_size=16, eval_interval=0, checkpoint_interval=0, log_interval=1)
    x = torch.randint(0, 32, (2, 17))
    tr = eng.Trainer(model, cfg, tmp_path, lambda s, sl, n: (x[sl, :-1], x[sl, 1:]), tokens_per_sample=16)
    assert tr.dtype == torch.float32 and not tr.autocast._enabled
    tr.fit()
    assert asked == [torch.float32]
    rec = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] <= 1 for r in rec if "mfu" in r)


def test_linear_shape_and_autocast():
    from gptlab.model import GPT, preset

    m = GPT(preset("tiny", vocab_size=50))
    C = m.cfg.n_embd
    assert linear_shape(m, 7) in ((7, C, 4 * C), (7, 4 * C, C))
    with autocast("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")  # fp32 means fp32, even inside another autocast


# --- the bf16 paths fall back instead of crashing --------------------------------------------------
def test_packed_linear_falls_back_where_onednn_cannot_pack(monkeypatch):
    from gptlab.generate import packed

    monkeypatch.setenv(OVERRIDE_ENV, "1")  # claims bf16 support: on an AVX2 CPU the packing raises

    def refuse(w, batch):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert ...")

    monkeypatch.setattr(packed.torch.ops.mkldnn, "_reorder_linear_weight", refuse, raising=False)
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    ref = F.linear(x := torch.randn(3, 16, dtype=torch.bfloat16), lin.weight, lin.bias)
    packed.pack_linears(lin)
    with torch.no_grad():
        y = lin(x)
    assert lin._packed is None and torch.equal(y, ref)


def test_packed_linear_skips_bf16_without_a_kernel(monkeypatch):
    from gptlab.generate.packed import pack_linears

    monkeypatch.setenv(OVERRIDE_ENV, "0")
    lin32, lin16 = nn.Linear(16, 8), nn.Linear(16, 8).to(torch.bfloat16)
    pack_linears(lin32)
    pack_linears(lin16)
    assert lin16._packed is None
    assert (lin32._packed is not None) == torch.backends.mkldnn.is_available()
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(lin32(x), F.linear(x, lin32.weight, lin32.bias))


@pytest.mark.parametrize("native", ["0", "1"])
def test_int8_long_inputs_gemm_in_bf16_only_where_native(monkeypatch, native):
    from gptlab.compress.quant import Int8Linear

    monkeypatch.setenv(OVERRIDE_ENV, native)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(40, 64)  # > SMALL_M rows: dequantize + one GEMM
    ref = x @ m.dequantize().t() + lin.bias.detach()
    err = (m(x) - ref).abs().max().item()
    if native == "0":
        assert err < 1e-5  # fp32 GEMM
    else:
        assert 1e-4 < err < 0.05  # bf16 GEMM: rounded, close


def test_int8_matmul_is_exact_with_and_without_int_mm(monkeypatch):
    import gptlab.compress.quant as q

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (33, 2100), dtype=torch.int8, generator=g)  # K crosses the 1024-column chunks
    b = torch.randint(-127, 128, (24, 2100), dtype=torch.int8, generator=g)
    a[0], b[0] = 127, -127  # the extremes: int16 saturation on AVX2 without VNNI
    exact = (a.long() @ b.long().t())
    assert torch.equal(q._int8_matmul(a, b).long(), exact)
    monkeypatch.setattr(q, "_int_mm_exact", lambda: False)
    assert torch.equal(q._int8_matmul(a, b).long(), exact)
