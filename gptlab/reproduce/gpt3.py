"""GPT-3 (Brown et al., 2020) at laptop scale: in-context learning, a task learned from K demonstrations in the
prompt with no gradient update, improves with K and with model size (Figure 1.2, §3.9); and GPT-3's alternating
dense / locally banded attention against all-dense attention at a long context.

cpu: three GPT-3-architecture models (pre-LN, alternating dense and banded layers, character tokens, context
512) trained by `gptlab pretrain` with GPT-3's optimiser recipe on one corpus: the built-in Shakespeare text
mixed with episodes of GPT-3's synthetic tasks (gptlab.reproduce.gpt3_tasks), each task's episodes made from the
training four fifths of its words and number pairs. Each model is then evaluated by `gptlab eval`'s harness on
the held-out fifth, with K = 0, 1, 2, 4, 8, 16 demonstrations, greedy exact match. Then one model size is
trained twice at the longest context this budget affords, all-dense vs alternating, for its loss and step time.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from pathlib import Path

from gptlab.fileio import atomic_write_json, read_json
from gptlab.reproduce import gpt3_tasks as tasks
from gptlab.reproduce.report import Reproduction
from gptlab.reproduce.steps import last_metric, pretrained

PAPER = ("Brown et al., Language Models are Few-Shot Learners, NeurIPS 2020 (GPT-3): Figure 1.2, §3.9.1-3.9.2; "
         "the banded layers after Child et al., Generating Long Sequences with Sparse Transformers, 2019")
SUMMARY = ("in-context learning of 5 synthetic tasks with K = 0…16 demonstrations across 3 sizes; dense vs "
           "alternating-banded attention at a long context (~30 min)")
SHOTS = (0, 1, 2, 4, 8, 16)
_CPU = dict(sizes=((2, 64, 2), (4, 128, 4), (4, 256, 4)), context=512, window=128, batch=16, steps=700, lr=2e-3,
            natural_chars=1_500_000, episode_fraction=0.7, words=3000, max_k=16, n_test=100,
            long_context=2048, long_window=256, long_size=(4, 128, 4), long_batch=4, long_steps=150)
SCALES = {
    "cpu": _CPU,
    # GPT-3 Small / Medium / Large's shapes at GPT-3's context (the corpus stays this one, in characters)
    "gpu": dict(_CPU, sizes=((12, 768, 12), (24, 1024, 16), (24, 1536, 16)), context=2048, window=256, batch=32,
                steps=10000, lr=6e-4, natural_chars=0, n_test=500, long_context=8192, long_window=256,
                long_size=(12, 768, 12), long_batch=8, long_steps=500),
    # a two-minute end-to-end check of the recipe (its numbers mean nothing)
    "smoke": dict(_CPU, sizes=((1, 32, 2), (2, 32, 2)), context=128, window=32, batch=4, steps=10,
                  natural_chars=30_000, words=300, max_k=4, n_test=8, long_context=256, long_window=32,
                  long_size=(1, 32, 2), long_batch=2, long_steps=6),
}


def _corpus(out: Path, s: dict, quiet: bool) -> tuple[Path, tasks.Vocab, dict]:
    """The mixed corpus, prepared (cached) -> (its folder, the word split, its make-up)."""
    from gptlab.data.prepare import prepare
    from gptlab.data.sources import shakespeare_files

    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in shakespeare_files())
    vocab = tasks.split_vocab(text.lower(), s["words"])
    natural = text[: s["natural_chars"]] if s["natural_chars"] else text
    eps = tasks.episodes(vocab, int(len(natural) * s["episode_fraction"] / (1 - s["episode_fraction"])), s["max_k"])
    mix = {"natural_chars": len(natural), "episode_chars": sum(map(len, eps)), "episodes": len(eps)}
    data = out / "data"
    if not (data / "meta.json").is_file():
        chunks = [c for c in re.split(r"\n\s*\n", natural) if c.strip()]  # paragraphs: speeches, stage directions
        docs = [{"text": c} for c in chunks] + [{"text": e} for e in eps]
        random.Random(0).shuffle(docs)
        src = out / "corpus.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        prepare(src, data, tokenizer="char", val_fraction=0.02, progress=not quiet)
        src.unlink()
    return data, vocab, mix


def _model(out: Path, data: Path, name: str, size: tuple, context: int, window: int, attention: tuple,
           steps: int, batch: int, s: dict, quiet: bool) -> Path:
    layers, width, heads = size
    run = out / name
    model = dict(n_layer=layers, n_embd=width, n_head=heads, head_dim=width // heads, block_size=context,
                 attention=list(attention), local_window=window)
    # GPT-3's recipe (Adam β2 0.95, weight decay 0.1, clip 1.0, cosine to 10%), its token-based warmups scaled
    # down to this budget
    train = dict(max_iters=steps, batch_size=batch, lr=s["lr"], warmup_iters=max(1, steps // 10), warmup_tokens=0,
                 decay_tokens=0, batch_warmup_tokens=0, eval_interval=0, checkpoint_interval=max(1, steps // 2),
                 dtype="auto", log_interval=max(1, steps // 20))
    if not quiet:
        print(f"{name}: {layers} × {width}, context {context}, {'/'.join(attention)} layers", flush=True)
    pretrained(data, run, "gpt3-small", "gpt3", model, train, quiet)
    return run


def _write_tasks(out: Path, vocab: tasks.Vocab, s: dict) -> dict:
    """One eval-harness task per synthetic task: held-out test rows, held-out demonstrations."""
    from gptlab.evaluate.tasks import load_task

    folder, defs = out / "tasks", {}
    folder.mkdir(exist_ok=True)
    for name in tasks.TASKS:
        test, demos = tasks.eval_rows(vocab, name, s["n_test"])
        for split, rows in (("test", test), ("train", demos)):
            (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        defs[name] = load_task({"name": name, "type": "generate", "template": "{input} =", "target": "{output}",
                                "target_delimiter": " ", "fewshot_delimiter": "\n",
                                "generation": {"max_new_tokens": 12, "stop": ["\n"]},
                                "data": {"test": str(folder / f"{name}_test.jsonl"),
                                         "train": str(folder / f"{name}_train.jsonl")}})
    return defs


def _icl(run_dir: Path, defs: dict) -> dict:
    """Exact match of each task at each K (cached beside the model) -> {task: {K: {"acc", "stderr", "shots"}}}."""
    from gptlab.evaluate.harness import run_task
    from gptlab.run import load_run

    done = run_dir / "in_context.json"
    if done.is_file():
        return read_json(done, "in-context results")
    run = load_run(run_dir)
    model, tok = run.model.float().eval(), run.tokenizer
    res = {}
    for name, task in defs.items():
        res[name] = {}
        for k in SHOTS:
            r = run_task(model, tok, task, shots=k, batch_size=50)
            res[name][str(k)] = {"acc": r["metrics"]["exact_match"], "stderr": r["metrics"].get("exact_match_stderr"),
                                 "shots": r["shots_used"]["mean"]}
    res["params"] = model.num_params(include_position=False) - model.wte.weight.numel()
    atomic_write_json(done, res)
    return res


def _speed(run_dir: Path) -> dict:
    """Validation loss and training throughput of a run, from its metrics.jsonl (the first log is warm-up)."""
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r][1:] or [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    per_step = next(r["batch_tokens"] for r in recs if "batch_tokens" in r)
    return {"val_loss": last_metric(run_dir, "val_loss"), "tok_per_s": statistics.median(tps),
            "ms_per_step": 1000 * per_step / statistics.median(tps)}


def run(out: Path, scale: str = "cpu", quiet: bool = False) -> Reproduction:
    from gptlab.reproduce.gpt3_report import report

    t0, s = time.perf_counter(), SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    data, vocab, mix = _corpus(out, s, quiet)
    defs = _write_tasks(out, vocab, s)
    sizes = {}
    for size in s["sizes"]:
        name = f"model-{size[0]}x{size[1]}"
        run_dir = _model(out, data, name, size, s["context"], s["window"], ("dense", "local"), s["steps"], s["batch"],
                         s, quiet)
        res = sizes[f"{size[0]} × {size[1]}"] = _icl(run_dir, defs)
        if not quiet:
            print("  in-context, K = 0 → 16: " + ", ".join(f"{t} {res[t]['0']['acc']:.2f} → {res[t]['16']['acc']:.2f}"
                                                         for t in tasks.TASKS), flush=True)
    attention = {}
    for kind, pattern in (("dense", ("dense",)), ("alternating", ("dense", "local"))):
        run_dir = _model(out, data, f"long-{kind}", s["long_size"], s["long_context"], s["long_window"], pattern,
                         s["long_steps"], s["long_batch"], s, quiet)
        attention[kind] = _speed(run_dir)
    measured = {"scale": scale, "mix": mix, "sizes": sizes, "attention": attention,
                "tokens_per_model": s["steps"] * s["batch"] * s["context"],
                "words": {"train": len(vocab.train["symbols"]), "heldout": len(vocab.heldout["symbols"])},
                "pairs": {"train": len(vocab.train["add2"]), "heldout": len(vocab.heldout["add2"])}}
    return report(out, s, measured, PAPER, SHOTS, time.perf_counter() - t0)
