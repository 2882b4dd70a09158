"""`gptlab compress report`: one row per run dir — method, bits, sparsity, parameters, size on disk,
validation perplexity and batch-1 decode speed — printed as a table and saved as markdown + JSON."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from gptlab.errors import GptlabError

COLUMNS = [("run", "run"), ("method", "method"), ("bits", "bits"), ("sparsity", "sparsity"), ("params", "params"),
           ("size_mb", "size MB"), ("val_ppl", "val ppl"), ("decode_tok_s", "decode tok/s (b=1)")]


@torch.no_grad()
def val_perplexity(model, data_dir, eval_tokens: int = 65536, seq_len: int | None = None, batch_size: int = 8) -> dict:
    """exp(mean next-token loss) over contiguous, non-overlapping val windows (the first eval_tokens
    tokens of the split; every token predicted once, with the window's context)."""
    from gptlab.data.loader import TokenData

    data = TokenData(data_dir)
    if data.vocab_size > model.cfg.vocab_size:
        raise GptlabError(f"{data_dir}: tokenized with vocab {data.vocab_size}, the model has {model.cfg.vocab_size}")
    T = min(seq_len or model.cfg.block_size, model.cfg.block_size)
    max_batches = max(1, math.ceil(eval_tokens / (T * batch_size)))
    nats, n = 0.0, 0
    for x, y in data.iter_eval_windows(T, batch_size, "val", max_batches):
        _, loss = model(x, y)
        nats += loss.item() * y.numel()
        n += y.numel()
    return {"val_loss": nats / n, "val_ppl": math.exp(nats / n), "eval_tokens": n, "seq_len": T}


def decode_speed(model, tokenizer, new_tokens: int = 64, prompt_tokens: int = 16, repeats: int = 2,
                 threads: int | None = None) -> float:
    """Tokens/s of greedy KV-cache decoding at batch 1 (the Generator every command uses), best of repeats;
    on `threads` intra-op threads if given."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _decode_speed(model, tokenizer, new_tokens, prompt_tokens, repeats)
    finally:
        torch.set_num_threads(old)


def _decode_speed(model, tokenizer, new_tokens: int, prompt_tokens: int, repeats: int) -> float:
    from gptlab.generate import Generator, SamplingParams

    gen = Generator(model, tokenizer)
    new_tokens = min(new_tokens, model.cfg.block_size - prompt_tokens - 1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompt = [tokenizer.eot_id] * prompt_tokens
    gen.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate([prompt], params)[0]
        best = max(best, len(out.token_ids) / (time.perf_counter() - t0))
    return best


def describe(cfg: dict, model) -> dict:
    """method / bits / sparsity from a run's compression record (dense runs: 'dense', 32 bits)."""
    from gptlab.compress.prune import sparsity_of

    steps = (cfg.get("compression") or {}).get("steps", [])
    names, bits = [], 32
    for s in steps:
        meth = s.get("method", "?")
        if meth == "nm" or (meth == "sparsegpt" and s.get("m")):
            meth += f" {s['n']}:{s['m']}"
        elif meth == "magnitude":
            meth += f" ({s.get('scope', 'layer')})"
        elif meth == "structured":
            meth += f" (-{s['heads_removed']} heads, -{s['ffn_removed']:.0%} ffn)"
        if s.get("bits") or s.get("quant_bits"):
            bits = s.get("bits") or s.get("quant_bits")
            if s.get("group_size"):
                meth += f" g{s['group_size']}"
            if s.get("act_order"):
                meth += " act-order"
        names.append(meth)
    # sparsity of pruning steps, measured on the saved weights (quantization alone rounds a few weights to 0:
    # not counted as sparsity)
    pruned = any(s.get("method") in ("magnitude", "nm", "sparsegpt") for s in steps)
    return {"method": " + ".join(names) or "dense", "bits": bits, "sparsity": round(sparsity_of(model), 4) if pruned else 0.0}


def report(run_dirs, *, data, out=None, eval_tokens: int = 65536, decode_tokens: int = 64, seq_len: int | None = None,
           decode_threads: int | None = None, quiet: bool = False) -> list[dict]:
    from gptlab.compress.format import stored_params
    from gptlab.run import load_run
    from gptlab.run.format import MODEL_FILE

    if not run_dirs:
        raise GptlabError("report needs at least one run dir")
    rows = []
    for rd in run_dirs:
        run = load_run(rd, device="cpu")
        row = {"run": str(rd), **describe(run.config, run.model), "params": stored_params(run.model),
               "size_mb": round((Path(rd) / MODEL_FILE).stat().st_size / 1e6, 2)}
        row.update(val_perplexity(run.model, data, eval_tokens, seq_len))
        row["decode_tok_s"] = (round(decode_speed(run.model, run.tokenizer, decode_tokens, repeats=3, threads=decode_threads), 1)
                               if decode_tokens else None)
        row["decode_threads"] = decode_threads or torch.get_num_threads()
        rows.append(row)
        if not quiet:
            print(f"  {rd}: ppl {row['val_ppl']:.3f}, {row['decode_tok_s']} tok/s", flush=True)
    text = markdown_table(rows)
    if not quiet:
        print(text)
    if out:
        from gptlab.fileio import atomic_write, atomic_write_json

        out = Path(out)
        atomic_write_json(out.with_suffix(".json"), rows)
        atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text(text + "\n"))
    return rows


def _fmt(key: str, v) -> str:
    if v is None:
        return "—"
    if key == "params":
        return f"{v / 1e6:.2f}M"
    if key == "sparsity":
        return f"{v:.1%}"
    if key == "val_ppl":
        return f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def dump(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)
