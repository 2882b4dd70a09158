"""report/report.md and its PNG plots, from the stage results in state.json and the runs' metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptlab.fileio import atomic_write
from gptlab.plot import Line, Panel, plot


def _f(v, nd: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "—" if v is None else str(v)


def _figure(src: Path, dst: Path, alt: str) -> list[str]:
    """A stage's own plot, copied beside the report (each stage draws its curves when it finishes)."""
    if not src.exists():
        return []
    shutil.copyfile(src, dst)
    return ["", f"![{alt}]({dst.name})"]


def write_report(ctx, hashes: dict[str, str]) -> Path:
    st, root = ctx.state, ctx.root
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    R = {name: s.get("result", {}) for name, s in st.stages.items() if hashes.get(name) == s.get("hash")}
    lines = ["# gptlab pipeline report", "",
             f"Corpus `{ctx.cfg.corpus}` · pipeline dir `{root}` · config `{root / 'pipeline.json'}`", "",
             f"Stage time in all: {_f(sum(s.get('elapsed_s') or 0 for s in st.stages.values()) / 60, 1)} min "
             "(cached stages count the time they took when they ran).", "",
             "| stage | status | time |", "|---|---|---|"]
    for name, h in hashes.items():
        s = st.stages.get(name, {})
        status = "disabled" if h == "off" else (s.get("status", "not run") if s.get("hash") == h else "not run")
        lines.append(f"| {name} | {status}{': ' + s['error'] if status == 'failed' and s.get('error') else ''} | "
                     f"{_f(s.get('elapsed_s'), 1) + ' s' if s.get('elapsed_s') is not None else '—'} |")

    if "pretrain" in R:
        p = R["pretrain"]
        lines += ["", "## Pretraining", "",
                  f"{p.get('params', 0) / 1e6:.2f}M parameters ({p.get('layers')} layers × {p.get('width')}), "
                  f"{p.get('step')} steps: val loss **{_f(p.get('val_loss'))}** (perplexity {_f(p.get('val_ppl'), 2)}) "
                  "on the whole val split."]
        lines += _figure(root / "pretrain" / "loss.png", out / "pretrain_loss.png", "pretraining loss")
    if R.get("evaluate", {}).get("cloze_acc"):
        e = R["evaluate"]
        lines += ["", "## Zero/few-shot evaluation (pretrained model)", "",
                  "Cloze: choose a speech's true second half among 4 (chance 25%).", "",
                  "| shots | accuracy |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in e["cloze_acc"].items()]
    if "synth" in R:
        d = R["synth"]
        lines += ["", "## Alignment data", "", "Made from the corpus by `gptlab.pipeline.synth` (see its docstring): "
                  f"{d.get('sft', 0)} demonstrations, {d.get('preferences', 0)} ranked comparisons, "
                  f"{d.get('prompts', 0)} PPO prompts, from {d.get('speeches', 0)} speeches by "
                  f"{d.get('characters', 0)} characters." if "skipped" not in d else f"skipped: {d['skipped']}"]
    if "sft" in R:
        lines += ["", "## SFT", "", f"val loss on held-out demonstrations (assistant tokens): "
                  f"**{_f(R['sft'].get('val_loss'))}** after {R['sft'].get('step')} steps."]
    if "reward" in R:
        r = R["reward"]
        lines += ["", "## Reward model", "", f"held-out pairwise accuracy **{_f(r.get('heldout_accuracy'), 3)}** "
                  f"(train {_f(r.get('train_accuracy'), 3)}); reward offset {_f(r.get('offset'), 3)}."]
        lines += _figure(root / "reward" / "accuracy.png", out / "reward_accuracy.png", "reward model accuracy")
    if "ppo" in R:
        p = R["ppo"]
        lines += ["", "## PPO", "", "Held-out prompts, sampled at temperature 1: reward (the reward model's, minus "
                  "the missing-end penalty), KL to the SFT reference in nats per response, share of replies ending "
                  "with `<|end|>`.", "", "| | reward | KL(π‖ref) | ended |", "|---|---|---|---|",
                  f"| before (SFT) | {_f(p.get('reward_before'))} | {_f(p.get('kl_before', 0.0))} | "
                  f"{_f(p.get('ended_before'), 2)} |",
                  f"| after | {_f(p.get('reward_after'))} | {_f(p.get('kl_after'))} | {_f(p.get('ended_after'), 2)} |"]
        lines += _figure(root / "ppo" / "reward.png", out / "ppo_reward.png", "PPO reward")
        lines += _figure(root / "ppo" / "kl.png", out / "ppo_kl.png", "PPO KL")
    if "dpo" in R:
        d = R["dpo"]
        lines += ["", "## DPO", "", f"held-out implicit-reward accuracy {_f(d.get('heldout_reward_accuracy'), 3)}, "
                  f"margin {_f(d.get('heldout_margin'), 3)}."]
    rows = R.get("compress", {}).get("table") or []
    if rows:
        from gptlab.compress.report import markdown_table

        lines += ["", "## Compression (of the PPO model)", "",
                  markdown_table([{**r, "run": Path(str(r.get("run", "?"))).name} for r in rows])]
        lines += ["", "Decode tokens/s at batch 1 on this machine; sparse weights are stored dense, so unstructured "
                  "sparsity makes the model no faster here (docs/compress.md says which formats are)."]
        dense = [(0.0, float(r["val_ppl"])) for r in rows if r.get("method") == "dense" and "val_ppl" in r]
        by_method: dict[str, list] = {}
        for r in rows:  # perplexity against sparsity, per pruning method, each starting from the dense model
            m = str(r.get("method", "")).split(" ")[0]
            if "val_ppl" in r and (r.get("sparsity") or 0) > 0.05 and m not in ("int8", "dense"):
                by_method.setdefault(m, list(dense)).append((float(r["sparsity"]), float(r["val_ppl"])))
        panels = [Panel([Line("", *map(list, zip(*sorted(pts))), style=".-")], k, "sparsity", "perplexity")
                  for k, pts in by_method.items()]
        if by_method and plot(out / "ppl_vs_sparsity.png", panels, "val perplexity vs sparsity"):
            lines += ["", "![perplexity vs sparsity](ppl_vs_sparsity.png)"]
    if R.get("evaluate_final", {}).get("models"):
        ms = R["evaluate_final"]["models"]
        shots = sorted({k for m in ms.values() for k in m.get("cloze_acc", {})})
        lines += ["", "## Evaluation of every model", "", "| model | val loss | val ppl | " +
                  " | ".join(f"cloze {k}" for k in shots) + " |", "|---|---|---|" + "---|" * len(shots)]
        lines += [f"| {k} | {_f(m['val_loss'])} | {_f(m['val_ppl'], 2)} | " +
                  " | ".join(f"{m.get('cloze_acc', {}).get(s, 0):.1%}" for s in shots) + " |" for k, m in ms.items()]
    if R.get("samples", {}).get("models"):
        sm = R["samples"]
        labels = list(sm["models"])
        lines += ["", "## Chat samples", "", "Mean over the samples' prompts: reward-model score (normalised), "
                  "the judge's score, and the share that ended with `<|end|>`.", "",
                  "| model | RM reward | judge | finished |", "|---|---|---|---|"]
        lines += [f"| {k} | {_f(v['rm_reward'], 3)} | {_f(v['judge'], 3)} | {v['finished']:.0%} |"
                  for k, v in sm["models"].items()]
        for i, prompt in enumerate(sm["prompts"][:4]):
            lines += ["", f"**User:** {prompt}", "", "| model | reply |", "|---|---|"]
            lines += [f"| {k} | {_cell(sm['models'][k]['replies'][i])} |" for k in labels]
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text, encoding="utf-8"))
    atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(R, indent=2, default=str)))
    return out / "report.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " / ")[:300] or "(empty)"
