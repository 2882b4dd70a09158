"""GPT-1 (Radford et al., 2018) at laptop scale: does generative pretraining on unlabelled in-domain text make
discriminative fine-tuning better, most of all when labels are few? On SST-2, as the paper's Table 5 and
Figure 2:

1. a GPT-1-architecture model (post-LN, GELU, learned positions; 4 × 256 on cpu) pretrained by `gptlab
   pretrain` on the SST-2 training phrases with their labels removed (a BPE of 4,000 merges trained on them);
2. `gptlab finetune` (GPT-1's task transformation, head and L3 = L2 + λ·L1) on the first 100 / 500 / 2,000 /
   5,000 / all labelled phrases: from the pretrained model or from random init (same architecture, tokenizer
   and recipe), with λ 0.5 or 0, and with only the embeddings and the first k blocks transferred;
3. zero-shot sentiment of each pretraining checkpoint by the paper's heuristic (append "very", compare the
   probabilities of " positive" and " negative"), raw and calibrated on a content-free input;
4. baselines on the same labels: the majority class and TF-IDF + logistic regression (scikit-learn).

Accuracy is measured on two held-out sets (see gptlab.reproduce.sst2): random phrases, most of which occur
inside training phrases, and whole unseen sentences.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from gptlab.fileio import atomic_write_json, read_json
from gptlab.reproduce import sst2
from gptlab.reproduce.report import Reproduction
from gptlab.reproduce.steps import last_metric, pretrained

PAPER = ("Radford, Narasimhan, Salimans & Sutskever, Improving Language Understanding by Generative Pre-Training, "
         "OpenAI 2018 (GPT-1): Table 5 and Figure 2")
SUMMARY = ("SST-2 from 100 to all labels: pretrained vs random init, λ 0.5 vs 0, layers transferred, zero-shot over "
           "pretraining, TF-IDF baseline (~30 min on 2 cores)")
ALL = 0  # a label budget of 0: every training phrase
_CPU = dict(layers=4, width=256, heads=4, context=64, bpe=4000, steps=900, batch=64, lr=1e-3, snapshots=6,
            labels=(100, 500, 2000, 5000, ALL), random_labels=(100, 500, 2000, 5000, ALL), lambda0_labels=(500, 5000),
            transfer_labels=2000, seeds=3, seeded_up_to=500, ft_lr=6e-4, min_examples=2400, all_epochs=1.0,
            heldout=2000, unseen=500, zero_shot=1000)
SCALES = {
    "cpu": _CPU,
    # the paper's model and fine-tuning epochs (BooksCorpus is not shipped: SST-2's phrases stay the corpus)
    "gpu": dict(_CPU, layers=12, width=768, heads=12, context=128, bpe=40000, steps=20000, lr=2.5e-4, ft_lr=6.25e-5,
                all_epochs=3.0, lambda0_labels=(500, 5000, ALL), transfer_labels=5000),
    # a two-minute end-to-end check of the recipe (its numbers mean nothing)
    "smoke": dict(_CPU, layers=2, width=32, heads=2, context=32, bpe=300, steps=24, batch=8, snapshots=2,
                  labels=(40, 120), random_labels=(40,), lambda0_labels=(120,), transfer_labels=40, seeds=2,
                  seeded_up_to=40, min_examples=64, heldout=60, unseen=20, zero_shot=30),
}
SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2" / "train.tsv"


def _splits(s: dict, source: Path) -> sst2.Splits:
    return sst2.make_splits(sst2.read_sst2(source), s["heldout"], s["unseen"], seed=0)


def _pretrain(out: Path, s: dict, splits: sst2.Splits, quiet: bool) -> Path:
    """The pretrained run (cached; resumed if cut): every `steps / snapshots` a checkpoint is kept for the
    zero-shot curve."""
    from gptlab.data.prepare import prepare

    corpus, run = out / "corpus", out / "pretrained"
    if not (corpus / "meta.json").is_file():  # the unlabelled training phrases, one document each
        docs = out / "pretrain_text.jsonl"
        docs.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in splits.train), encoding="utf-8")
        prepare(docs, corpus, tokenizer=f"bpe:{s['bpe']}", val_fraction=0.05, progress=not quiet)
    model = dict(n_layer=s["layers"], n_head=s["heads"], n_embd=s["width"], block_size=s["context"])
    train = dict(max_iters=s["steps"], batch_size=s["batch"], lr=s["lr"], warmup_iters=max(1, s["steps"] // 10),
                 grad_clip=1.0, eval_interval=0, checkpoint_interval=max(1, s["steps"] // s["snapshots"]),
                 keep_last=s["snapshots"] + 1, dtype="auto", log_interval=50)
    pretrained(corpus, run, "gpt1", "gpt1", model, train, quiet)
    return run


def _zero_shot(run_dir: Path, rows: list[sst2.Row]) -> list[dict]:
    """GPT-1 §5 heuristic at each checkpoint: sentence + " very" -> " positive" or " negative", whichever is
    likelier; calibrated: against the same log-odds after the content-free input "very" (Zhao et al., 2021)."""
    import torch

    from gptlab.evaluate.scoring import encode_pair, score_pairs
    from gptlab.run import load_run
    from gptlab.run.format import MODEL_FILE, load_model_weights

    run = load_run(run_dir)
    tok, model = run.tokenizer, run.model.float()
    words = (" positive", " negative")
    contexts = ["very"] + [f"{t} very" for _, t in rows]  # the content-free input first
    pairs = [encode_pair(tok, c, w) for c in contexts for w in words]
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        load_model_weights(model, ckpt / MODEL_FILE)
        with torch.inference_mode():
            lp = [sc.logprob for sc in score_pairs(model.eval(), pairs, batch_size=64)]
        odds = [lp[i] - lp[i + 1] for i in range(0, len(lp), 2)]
        bias, odds = odds[0], odds[1:]
        curve.append({"step": int(ckpt.name.split("_")[1]),
                      "raw": sum((o > 0) == bool(y) for o, (y, _) in zip(odds, rows)) / len(rows),
                      "calibrated": sum((o > bias) == bool(y) for o, (y, _) in zip(odds, rows)) / len(rows)})
    return curve


def _finetune(out: Path, name: str, s: dict, n: int, splits: sst2.Splits, pre: Path, quiet: bool, *,
              random_init: bool = False, lm_coef: float = 0.5, transfer: int | None = None, seed: int = 0) -> dict:
    """One fine-tuning arm (cached in its run dir) -> {"heldout": accuracy, "unseen": accuracy, ...}."""
    from gptlab.finetune import finetune, predict
    from gptlab.run import load_run

    run = out / "finetune" / name
    done = run / "accuracy.json"
    if done.is_file():
        return read_json(done, "accuracy")
    labelled = splits.train[:n] if n else splits.train
    data = sst2.write_tsv(out / "labels" / f"{n or 'all'}.tsv", labelled)
    epochs = s["all_epochs"] if n == ALL else max(3.0, s["min_examples"] / len(labelled))
    group = min(1600, len(labelled) // 8) if len(labelled) >= 256 else 0  # batches of like lengths pad little
    train = dict(lr=s["ft_lr"], batch_size=32, eval_interval=0, checkpoint_interval=0, seed=1337 + seed,
                 group_by_length=group, dtype="auto", log_interval=50)
    t0 = time.perf_counter()
    if not quiet:
        print(f"fine-tune {name}: {len(labelled):,} labels, {epochs:g} epochs", flush=True)
    res = finetune(run, data, init_from=pre, init="random" if random_init else None, dev=out / "heldout.tsv",
                   lm_coef=lm_coef, epochs=epochs, train_layers=(train,), transfer_layers=transfer, quiet=True,
                   resume=(run / "latest.json").exists())
    preds = predict(load_run(run), [t for _, t in splits.unseen])
    unseen = sum(p.label == str(y) for p, (y, _) in zip(preds, splits.unseen)) / len(splits.unseen)
    acc = {"heldout": res["val_acc"], "unseen": unseen, "labels": len(labelled), "epochs": epochs,
           "steps": res["step"], "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(done, acc)
    if not quiet:
        print(f"  held-out {acc['heldout']:.4f} · unseen sentences {unseen:.4f} · {acc['seconds']:.0f} s", flush=True)
    return acc


def _mean(accs: list[dict], key: str) -> float:
    return statistics.fmean(a[key] for a in accs)


def run(out: Path, scale: str = "cpu", quiet: bool = False, source: Path | None = None) -> Reproduction:
    from gptlab.reproduce.gpt1_report import report

    t0, s = time.perf_counter(), SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    splits = _splits(s, Path(source or SST2))
    sst2.write_tsv(out / "heldout.tsv", splits.heldout)
    pre = _pretrain(out, s, splits, quiet)
    if not quiet:
        print("zero-shot over pretraining checkpoints…", flush=True)
    zero = _zero_shot(pre, splits.heldout[: s["zero_shot"]])

    def arm(tag: str, n: int, seeded: bool = True, **kw) -> list[dict]:  # seeds where labels are few (spread)
        seeds = range(s["seeds"]) if seeded and 0 < n <= s["seeded_up_to"] else range(1)
        return [_finetune(out, f"{tag}-{n or 'all'}" + (f"-seed{k}" if k else ""), s, n, splits, pre, quiet, seed=k, **kw)
                for k in seeds]

    arms = {"pretrained, λ 0.5": {n: arm("pre", n) for n in s["labels"]},
            "random init, λ 0.5": {n: arm("rand", n, random_init=True) for n in s["random_labels"]},
            "pretrained, λ 0": {n: arm("pre-lm0", n, seeded=False, lm_coef=0.0) for n in s["lambda0_labels"]}}
    n_t = s["transfer_labels"]
    transfer = {k: arm(f"transfer{k}", n_t, seeded=False, transfer=k) for k in range(s["layers"])}
    transfer[s["layers"]] = arms["pretrained, λ 0.5"][n_t][:1]
    baselines = {n: sst2.tfidf_accuracy(splits.train[:n] if n else splits.train,
                                        {"heldout": splits.heldout, "unseen": splits.unseen}) for n in s["labels"]}
    majority = {"heldout": sst2.majority(splits.train, splits.heldout), "unseen": sst2.majority(splits.train, splits.unseen)}
    val_loss = last_metric(pre, "val_loss")
    accs = {name: {n: {k: _mean(v, k) for k in ("heldout", "unseen")} | {"runs": v} for n, v in d.items()}
            for name, d in arms.items()}
    measured = dict(scale=scale, splits={"train": len(splits.train), "heldout": len(splits.heldout),
                                         "unseen": len(splits.unseen), "heldout_inside_train": splits.inside,
                                         "removed_parts_of_unseen": splits.removed},
                    pretrain_val_loss=val_loss, pretrain_tokens=s["steps"] * s["batch"] * s["context"],
                    zero_shot=zero, arms=accs, transfer={k: v[0] for k, v in transfer.items()}, tfidf=baselines,
                    majority=majority)
    return report(out, s, measured, PAPER, time.perf_counter() - t0)
