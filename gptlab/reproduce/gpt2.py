"""GPT-2 (Radford et al., 2019) at laptop scale: language models of growing size, trained on one corpus with one
token budget, get lower perplexity along a power law in their parameters (Kaplan et al., 2020), and their
zero-shot transfer grows with capacity.

cpu: four GPT-2-architecture models (pre-LN + final LN, scaled residual init; 2 × 64 up to 6 × 384) trained by
`gptlab pretrain` on the built-in Shakespeare corpus (42 Gutenberg plays and poems, byte-level BPE of 4,000
merges trained on it) for the same 1.5M tokens each. Measured for each: perplexity on the whole validation
split; zero-shot last-word accuracy on passages cut from the held-out text (LAMBADA-style: the passage without
its last word is the prompt, greedy exact match on the word); zero-shot SST-2 by the built-in prompt
("Sentence: … Sentiment:" → " negative" / " positive").
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from gptlab.fileio import atomic_write_json, read_json
from gptlab.reproduce.report import Reproduction
from gptlab.reproduce.steps import last_metric, pretrained

PAPER = ("Radford, Wu, Child, Luan, Amodei & Sutskever, Language Models are Unsupervised Multitask Learners, "
         "OpenAI 2019 (GPT-2); the power law as in Kaplan et al., Scaling Laws for Neural Language Models, 2020")
SUMMARY = "4 model sizes, one corpus and budget: perplexity power law, zero-shot last word and SST-2 vs size (~25 min)"
_CPU = dict(sizes=((2, 64, 2), (4, 128, 4), (4, 256, 4), (6, 384, 6)), context=128, bpe=4000, batch=24, steps=500,
            lr=1e-3, passages=500, passage_words=60, sst2=872)
SCALES = {
    "cpu": _CPU,
    # GPT-2's 117M and 345M beside two smaller ones, GPT-2's tokenizer
    "gpu": dict(_CPU, sizes=((4, 256, 4), (6, 512, 8), (12, 768, 12), (24, 1024, 16)), context=1024, bpe=0,
                batch=32, steps=10000, lr=6e-4, passages=2000),
    "smoke": dict(_CPU, sizes=((1, 32, 2), (2, 48, 2)), context=32, bpe=300, batch=4, steps=10, passages=20, sst2=40),
}
KAPLAN_ALPHA_N = 0.076  # L(N) ∝ N^-0.076 for models trained to convergence (Kaplan et al., eq. 1.1)
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _corpus(out: Path, s: dict, quiet: bool) -> Path:
    from gptlab.data.prepare import prepare

    data = out / "data"
    if not (data / "meta.json").is_file():
        prepare("shakespeare", data, tokenizer=f"bpe:{s['bpe']}" if s["bpe"] else "gpt2", val_fraction=0.05,
                progress=not quiet)
    return data


def _train(out: Path, data: Path, s: dict, size: tuple, quiet: bool) -> Path:
    layers, width, heads = size
    run = out / f"model-{layers}x{width}"
    model = dict(n_layer=layers, n_embd=width, n_head=heads, block_size=s["context"])
    train = dict(max_iters=s["steps"], batch_size=s["batch"], lr=s["lr"], warmup_iters=max(1, s["steps"] // 10),
                 eval_interval=0, checkpoint_interval=max(1, s["steps"] // 2), dtype="auto", log_interval=50)
    if not quiet:
        print(f"model {layers} × {width}", flush=True)
    pretrained(data, run, "gpt2", "nanogpt", model, train, quiet)
    return run


def _passages(out: Path, data: Path, s: dict) -> Path:
    """LAMBADA-style passages from the held-out text: `passage_words` words ending in a word of ≥ 4 letters that
    already occurs earlier in the passage (as LAMBADA's targets mostly do: the context, not the last sentence,
    gives the word away)."""
    from gptlab.data.loader import TokenData

    path = out / "last_word.jsonl"
    if path.is_file():
        return path
    d = TokenData(data)
    tok = d.tokenizer()
    ids = [int(t) for t in d.read_tokens("val") if int(t) != tok.eot_id]
    words = tok.decode(ids).split()
    n, rows = s["passage_words"], []
    for end in range(n, len(words), max(1, (len(words) - n) // (20 * s["passages"]))):
        last = words[end - 1]
        if last.isalpha() and len(last) >= 4 and last in words[end - n:end - 1]:
            rows.append({"text": " ".join(words[end - n:end])})
        if len(rows) == s["passages"]:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _measure(run_dir: Path, passages: Path, s: dict, sst2: tuple | None) -> dict:
    """Validation loss, last-word and SST-2 zero-shot accuracy of one model (cached beside it). sst2: (task,
    its data root) or None."""
    from gptlab.evaluate.harness import run_task
    from gptlab.evaluate.tasks import load_task
    from gptlab.run import load_run

    done = run_dir / "zero_shot.json"
    if done.is_file():
        return read_json(done, "zero-shot results")
    run = load_run(run_dir)
    model, tok = run.model.float(), run.tokenizer
    val = last_metric(run_dir, "val_loss")
    lw = run_task(model, tok, load_task({"name": "last-word", "type": "last_word", "template": "{context}",
                                          "target": "{last_word}", "target_delimiter": " ", "text_field": "text",
                                          "data": {"test": str(passages)}}), batch_size=32)["metrics"]
    res = {"params": model.num_params(include_position=False) - model.wte.weight.numel(), "val_loss": val,
           "last_word_acc": lw["acc"], "last_word_ppl": lw["perplexity"]}
    if sst2 is not None:
        res["sst2_acc"] = run_task(model, tok, sst2[0], data_root=sst2[1], limit=s["sst2"], batch_size=32)["metrics"]["acc"]
    atomic_write_json(done, res)
    return res


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares of log L = log a − α log N -> (α, a, R²)."""
    xs, ys = [math.log(n) for n, _ in points], [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    total = sum((y - my) ** 2 for y in ys)
    return -slope, math.exp(my - slope * mx), 1 - resid / total if total else 1.0


def run(out: Path, scale: str = "cpu", quiet: bool = False, source: Path | None = None) -> Reproduction:
    from gptlab.reproduce.gpt2_report import report

    t0, s = time.perf_counter(), SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    data = _corpus(out, s, quiet)
    passages = _passages(out, data, s)
    # SST-2: the built-in task's seeded held-out sentences from ../shared/data, or the first of --data's
    from gptlab.evaluate.tasks import load_task

    sst2 = (load_task(f"sst2={source}"), None) if source else \
        (load_task("sst2"), SHARED) if (SHARED / "sst2" / "train.tsv").is_file() else None
    sizes = {f"{layers} × {width}": _measure(_train(out, data, s, (layers, width, heads), quiet), passages, s, sst2)
             for layers, width, heads in s["sizes"]}
    alpha, a, r2 = _fit([(m["params"], m["val_loss"]) for m in sizes.values()])
    n_passages = sum(1 for _ in passages.open(encoding="utf-8"))
    measured = {"scale": scale, "sizes": sizes, "fit": {"alpha": alpha, "a": a, "r2": r2},
                "tokens_per_model": s["steps"] * s["batch"] * s["context"], "passages": n_passages,
                "sst2": sst2 is not None}
    return report(out, s, measured, PAPER, KAPLAN_ALPHA_N, time.perf_counter() - t0)
