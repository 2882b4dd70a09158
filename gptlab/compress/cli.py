"""`gptlab compress quantize|prune|sparsegpt|report`, wired into gptlab/cli.py with add_compress_parser."""

from __future__ import annotations

import argparse

from gptlab.errors import GptlabError


def cmd_compress_quantize(a) -> None:
    from gptlab.compress.api import quantize

    out = quantize(a.run_dir, a.out, method=a.method, bits=a.bits, group_size=a.group_size, data=a.data,
                   calib_samples=a.calib_samples, seq_len=a.seq_len, act_order=a.act_order, threshold=a.threshold)
    print(f"wrote {out}")


def cmd_compress_prune(a) -> None:
    from gptlab.compress.api import prune

    if a.method == "nm" and not (a.n and a.m):
        raise GptlabError("--method nm needs --n and --m (e.g. --n 2 --m 4)")
    out = prune(a.run_dir, a.out, method=a.method, sparsity=a.sparsity, scope=a.scope, n=a.n, m=a.m, heads=a.heads,
                ffn=a.ffn)
    print(f"wrote {out}")


def cmd_compress_sparsegpt(a) -> None:
    from gptlab.compress.api import sparsegpt

    out = sparsegpt(a.run_dir, a.out, data=a.data, sparsity=a.sparsity, n=a.n, m=a.m, quant_bits=a.quant_bits,
                    calib_samples=a.calib_samples, seq_len=a.seq_len, blocksize=a.blocksize, percdamp=a.percdamp)
    print(f"wrote {out}")


def cmd_compress_report(a) -> None:
    from gptlab.compress.api import report

    report(a.run_dirs, data=a.data, out=a.out, eval_tokens=a.eval_tokens, decode_tokens=a.decode_tokens,
           seq_len=a.seq_len, decode_threads=a.decode_threads)


def _calib_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, help="prepared data dir (gptlab prepare): calibration windows come "
                                                     "from its train split")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default: model context)")


def add_compress_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compress", help="quantize (INT8, LLM.int8, GPTQ), prune (magnitude, N:M, structured), "
                                        "SparseGPT, and compare the results",
                       description="Each command writes a run dir that generate/chat/evaluate/serve load unchanged. "
                                   "Faster on CPU: int8 weight-only and 4-bit (batch-1 decoding; 4-bit needs torch's int4 "
                                   "CPU kernel) and structured pruning. Only smaller: 2-3-bit. Neither: unstructured "
                                   "and N:M sparsity (stored dense; shows the accuracy cost of a pattern).")
    csub = c.add_subparsers(dest="compress_cmd", required=True)

    q = csub.add_parser("quantize", help="int8 weight-only | llm-int8 | rtn | gptq")
    q.add_argument("run_dir")
    q.add_argument("--out", required=True, help="run dir to write")
    q.add_argument("--method", choices=["int8", "llm-int8", "rtn", "gptq"], default="int8")
    q.add_argument("--bits", type=int, default=None, help="weight bits: 8 (int8, llm-int8) or 2/3/4/8 (rtn, gptq; "
                                                          "default 4)")
    q.add_argument("--group-size", type=int, default=0, help="rtn/gptq: input columns per scale (0 = per channel)")
    q.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--threshold", type=float, default=6.0, help="llm-int8: outlier feature threshold |x|")
    _calib_args(q, required=False)
    q.set_defaults(func=lambda a: cmd_compress_quantize(_default_bits(a)))

    p = csub.add_parser("prune", help="magnitude (layer|global) | nm (N:M) | structured (heads, FFN channels)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--method", choices=["magnitude", "nm", "structured"], default="magnitude")
    p.add_argument("--sparsity", type=float, default=0.5, help="magnitude: fraction of weights zeroed")
    p.add_argument("--scope", choices=["layer", "global"], default="layer", help="magnitude: per layer or global")
    p.add_argument("--n", type=int, default=0, help="nm: weights kept of every --m consecutive ones")
    p.add_argument("--m", type=int, default=0)
    p.add_argument("--heads", type=int, default=0, help="structured: attention heads removed per layer")
    p.add_argument("--ffn", type=float, default=0.0, help="structured: fraction of FFN channels removed per layer")
    p.set_defaults(func=cmd_compress_prune)

    s = csub.add_parser("sparsegpt", help="one-shot SparseGPT pruning (unstructured or N:M, optional quantization)")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--sparsity", type=float, default=0.5)
    s.add_argument("--n", type=int, default=0, help="N:M: weights kept of every --m (2:4 = --n 2 --m 4)")
    s.add_argument("--m", type=int, default=0)
    s.add_argument("--quant-bits", type=int, default=0, help="joint quantization of the kept weights (0 = off)")
    s.add_argument("--blocksize", type=int, default=128, help="columns per lazy-update block")
    s.add_argument("--percdamp", type=float, default=0.01, help="dampening as a fraction of mean diag(H)")
    _calib_args(s, required=True)
    s.set_defaults(func=cmd_compress_sparsegpt)

    r = csub.add_parser("report", help="table of method, bits, sparsity, params, size, val perplexity, decode tok/s")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--data", required=True, help="prepared data dir: val split for perplexity")
    r.add_argument("--out", help="write OUT.md and OUT.json")
    r.add_argument("--eval-tokens", type=int, default=65536, help="val tokens scored per run")
    r.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded for the speed figure (0 = skip)")
    r.add_argument("--seq-len", type=int, default=None, help="val window length (default: model context)")
    r.add_argument("--decode-threads", type=int, default=None, help="intra-op threads for the decode timing "
                                                                    "(default: torch's; 1 is fastest for small models)")
    r.set_defaults(func=cmd_compress_report)
    return c


def _default_bits(a):
    if a.bits is None:
        a.bits = 4 if a.method in ("rtn", "gptq") else 8
    return a


def register(sub) -> None:
    add_compress_parser(sub)
