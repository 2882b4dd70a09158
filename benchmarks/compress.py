"""Compression benchmark: every `gptlab compress` method on two models, one table each, and the issue's targets.

(a) shakespeare: small-6x384 (12.3M parameters, context 128) pretrained by gptlab on the built-in Shakespeare
    corpus with a 4000-merge BPE (~8-10 min on 2 free cores; cached under runs/bench-compress/).
(b) gpt2-124m: the GPT-2 124M config (12×768, GPT-2 BPE, 50257 vocab). No pretrained weights can be
    downloaded here and training 124M on 2 shared cores is out of reach, so it is RANDOMLY INITIALIZED
    (GPT-2's init, seed 0). Its perplexity is ~uniform over the vocabulary and its compression deltas say
    nothing about accuracy; this model is here for the runtime target (SparseGPT on 124M ≤ 10 min on
    2 cores), sizes and decode speed.

Decode speed is the KV-cache Generator at batch 1 (greedy, 64 new tokens, best of 3) on 1 thread (at batch 1
a second thread mostly adds synchronization; on this shared machine it made decoding erratic). The dense
baseline decodes through gptlab's prepacked oneDNN fp32 path (gptlab/generate/packed.py), the in-run baseline.
Compression itself runs on the threads torch is given (OMP_NUM_THREADS; the 124M SparseGPT target is "2 cores").

    flock /tmp/gptlab-heavy.lock env OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compress.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path("runs/bench-compress")


def ensure_shakespeare() -> tuple[Path, Path]:
    from gptlab.data.prepare import prepare
    from gptlab.pretrain import pretrain

    data, run = ROOT / "data", ROOT / "shakespeare-6x384"
    if not (data / "meta.json").is_file():
        prepare("shakespeare", data, tokenizer="bpe:4000")
    if not (run / "model.safetensors").is_file():
        pretrain(str(data), str(run), preset_name="small-6x384", recipe="nanogpt",
                 model_overrides=dict(block_size=128, embd_pdrop=0.1, attn_pdrop=0.0, resid_pdrop=0.1),
                 train_layers=(dict(max_iters=1000, batch_size=16, block_size=128, lr=1e-3, eval_interval=500,
                                    eval_iters=10, checkpoint_interval=250, log_interval=50),))
    return data, run


def ensure_gpt2() -> tuple[Path, Path]:
    from gptlab.data.prepare import prepare
    from gptlab.model import GPT, preset
    from gptlab.run import write_run_config
    from gptlab.tokenizer.bpe import gpt2_tokenizer
    from gptlab.run.format import MODEL_FILE, save_model

    data, run = ROOT / "data-gpt2", ROOT / "gpt2-124m-random"
    if not (data / "meta.json").is_file():
        prepare("shakespeare", data, tokenizer="gpt2")
    if not (run / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = GPT(preset("gpt2", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0))
        save_model(model, run / MODEL_FILE)
        write_run_config(run, model.cfg, gpt2_tokenizer(), stage="random-init")
    return data, run


def methods(data: Path, seq_len: int, calib: int, group: int) -> dict:
    from gptlab.compress import api

    q = lambda **k: lambda src, out: api.quantize(src, out, **k)  # noqa: E731
    p = lambda **k: lambda src, out: api.prune(src, out, **k)  # noqa: E731
    s = lambda **k: lambda src, out: api.sparsegpt(src, out, data=data, calib_samples=calib, seq_len=seq_len, **k)  # noqa: E731
    g = dict(data=data, calib_samples=calib, seq_len=seq_len)
    return {
        "int8": q(method="int8"),
        "llm-int8": q(method="llm-int8"),
        "rtn4": q(method="rtn", bits=4),
        "gptq4": q(method="gptq", bits=4, **g),
        f"rtn4-g{group}": q(method="rtn", bits=4, group_size=group),
        f"gptq4-g{group}": q(method="gptq", bits=4, group_size=group, act_order=True, **g),
        "magnitude50": p(method="magnitude", sparsity=0.5),
        "sparsegpt50": s(sparsity=0.5),
        "magnitude2:4": p(method="nm", n=2, m=4),
        "sparsegpt2:4": s(n=2, m=4),
        "sparsegpt50+int8": s(sparsity=0.5, quant_bits=8),
        "structured": p(method="structured", heads=2, ffn=0.5),
    }


def run_model(name: str, data: Path, src: Path, seq_len: int, calib: int, group: int, eval_tokens: int,
              only: set[str] | None) -> list[dict]:
    from gptlab.compress.report import report

    outdir = ROOT / name
    timings = {}
    for key, fn in methods(data, seq_len, calib, group).items():
        if only and key not in only:
            continue
        t0 = time.perf_counter()
        fn(src, outdir / key.replace(":", "-"))
        timings[key] = time.perf_counter() - t0
        print(f"[{name}] {key}: {timings[key]:.1f} s", flush=True)
    runs = [src] + [outdir / k.replace(":", "-") for k in timings]
    rows = report(runs, data=data, out=outdir / "report", eval_tokens=eval_tokens, decode_tokens=64, seq_len=seq_len,
                  decode_threads=1)
    for r, k in zip(rows[1:], timings):
        r["key"], r["compress_s"] = k, round(timings[k], 1)
    rows[0]["key"] = "dense"
    (outdir / "report.json").write_text(json.dumps(rows, indent=2))
    return rows


def check_targets(name: str, rows: list[dict], accuracy: bool = True) -> list[str]:
    """The issue's targets; accuracy=False (random weights) checks only speed, size and runtime."""
    by = {r["key"]: r for r in rows}
    d = by["dense"]["val_ppl"]
    rise = lambda k: by[k]["val_ppl"] - d  # noqa: E731
    out = []

    def t(label, ok, detail):
        out.append(f"[{name}] {'MET ' if ok else 'MISS'} {label}: {detail}")

    if not accuracy:
        by = {k: v for k, v in by.items() if k in ("dense", "int8", "sparsegpt50")}
    if accuracy and {"sparsegpt50", "magnitude50"} <= by.keys():
        t("SparseGPT 50% rise ≤ ¼ magnitude 50% rise", rise("sparsegpt50") <= 0.25 * rise("magnitude50"),
          f"+{rise('sparsegpt50'):.3f} vs +{rise('magnitude50'):.3f} (ratio {rise('sparsegpt50') / max(rise('magnitude50'), 1e-9):.2f})")
    if {"sparsegpt2:4", "magnitude2:4"} <= by.keys():
        a, b = by["sparsegpt2:4"]["val_ppl"], by["magnitude2:4"]["val_ppl"]
        t("2:4 ordering dense < SparseGPT ≪ magnitude", d < a < b, f"{d:.3f} < {a:.3f} < {b:.3f} (rise ratio "
          f"{(a - d) / max(b - d, 1e-9):.2f})")
    if "int8" in by:
        ch = by["int8"]["val_ppl"] / d - 1
        sp = by["int8"]["decode_tok_s"] / by["dense"]["decode_tok_s"]
        if accuracy:
            t("INT8 val ppl change ≤ 1%", abs(ch) <= 0.01, f"{ch:+.3%}")
        t("INT8 decode ≥ 1.5× fp32", sp >= 1.5, f"{by['int8']['decode_tok_s']} vs {by['dense']['decode_tok_s']} tok/s = {sp:.2f}×")
    for a, b in (("gptq4", "rtn4"), *[(k, "rtn4-" + k.split("-", 1)[1]) for k in by if k.startswith("gptq4-g")]):
        if {a, b} <= by.keys():
            t(f"{a} ppl < {b}", by[a]["val_ppl"] < by[b]["val_ppl"], f"{by[a]['val_ppl']:.3f} vs {by[b]['val_ppl']:.3f}")
    if "sparsegpt50" in by and name == "gpt2-124m":
        t("SparseGPT on 124M ≤ 10 min", by["sparsegpt50"]["compress_s"] <= 600, f"{by['sparsegpt50']['compress_s']:.0f} s "
          f"({torch.get_num_threads()} threads)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["shakespeare", "gpt2"], help="one model only")
    ap.add_argument("--methods", help="comma-separated subset of method keys")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows")
    args = ap.parse_args()
    only = set(args.methods.split(",")) if args.methods else None
    lines = []
    if args.only in (None, "shakespeare"):
        data, src = ensure_shakespeare()
        rows = run_model("shakespeare", data, src, 128, args.calib, 128, 1 << 16, only)
        lines += check_targets("shakespeare", rows)
    if args.only in (None, "gpt2"):
        data, src = ensure_gpt2()
        # random weights: accuracy deltas mean nothing here, so only what speed, size and runtime need
        keep = only or {"int8", "magnitude50", "sparsegpt50", "structured"}
        rows = run_model("gpt2-124m", data, src, 256, args.calib, 128, 1 << 13, keep)
        lines += check_targets("gpt2-124m", rows, accuracy=False)
    print("\n".join(lines))
    for path in (ROOT / "shakespeare" / "report.md", ROOT / "gpt2-124m" / "report.md"):
        if path.is_file():
            print(f"\n{path}:\n{path.read_text()}")


if __name__ == "__main__":
    main()
