"""The pipeline's stages. Each is a thin call into the command that owns the work (prepare, pretrain,
evaluate, sft, reward, ppo, dpo, compress, generate): no stage has its own training loop or model code.

A stage is `run(ctx, section, resume) -> result` (a small JSON-able dict of figures for the report),
with the stages it reads from (`deps`) and the user files it names (`files`), which make up its cache key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gptlab.errors import GptlabError
from gptlab.pipeline.config import PipelineConfig
from gptlab.pipeline.state import PipelineState
from gptlab.run.format import CONFIG_FILE, MODEL_FILE


@dataclass
class Ctx:
    cfg: PipelineConfig
    root: Path
    state: PipelineState

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def synth(self, name: str) -> Path:
        return self.root / "synth" / f"{name}.jsonl"


@dataclass
class Stage:
    name: str
    deps: tuple[str, ...]
    run: Callable[[Ctx, dict, bool], dict]
    files: Callable[[Ctx, dict], list] = lambda ctx, c: []
    enabled: Callable[[Ctx, dict], bool] = lambda ctx, c: True
    trains: bool = False  # writes checkpoints: an interrupted run resumes instead of starting over
    out: str | None = "="  # the folder it writes under the pipeline dir ("=": its name; None: none)


def _local(path) -> list:
    return [path] if path and Path(path).exists() else []


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --- tokenizer → prepare → pretrain --------------------------------------------------------------------
def _tokenizer(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.data.sources import iter_documents
    from gptlab.tokenizer import TOKENIZER_FILE, build_tokenizer

    tok = build_tokenizer(c.get("spec", "bpe:4000"), list(iter_documents(ctx.cfg.corpus)))
    out = ctx.dir("tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / TOKENIZER_FILE)
    return {"kind": tok.kind, "vocab_size": tok.vocab_size, "spec": c.get("spec", "bpe:4000")}


def _prepare(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.data.prepare import prepare
    from gptlab.tokenizer import TOKENIZER_FILE

    m = prepare(ctx.cfg.corpus, ctx.dir("data"), tokenizer=str(ctx.dir("tokenizer") / TOKENIZER_FILE),
                val_fraction=c.get("val_fraction", 0.1), seed=ctx.cfg.seed, num_workers=c.get("workers"))
    return {"documents": m["n_documents"], "train_tokens": m["train"]["tokens"], "val_tokens": m["val"]["tokens"]}


def _pretrain(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.run import read_run_config
    from gptlab.pretrain import pretrain

    out = ctx.dir("pretrain")
    r = pretrain(str(ctx.dir("data")), str(out), preset_name=c.get("preset", "small-4x128"),
                 recipe=c.get("recipe", "nanogpt"), model_overrides=c.get("model") or {},
                 train_layers=({"seed": ctx.cfg.seed, **(c.get("train") or {})},), resume=resume)
    cfg = read_run_config(out)["model"]
    return {"val_loss": r.get("val_loss"), "val_ppl": _ppl(r.get("val_loss", float("nan"))), "step": r.get("step"),
            "layers": cfg["n_layer"], "width": cfg["n_embd"], "params": _n_params(out)}


def _n_params(run_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run_dir / MODEL_FILE), "pt") as f:  # tied weights are stored once
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# --- synthetic alignment data, evaluation ----------------------------------------------------------------
def _synth(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.data.sources import iter_documents
    from gptlab.pipeline.synth import make_datasets

    try:
        return make_datasets(list(iter_documents(ctx.cfg.corpus)), ctx.dir("synth"), seed=ctx.cfg.seed,
                             **{k: v for k, v in c.items() if k in ("n_sft", "n_pref", "n_prompts", "n_cloze", "max_words")})
    except GptlabError as e:  # a corpus not in play layout is fine when every stage has its own files
        if ctx.cfg.sft.get("data") and ctx.cfg.reward.get("data") and ctx.cfg.ppo.get("prompts"):
            return {"skipped": str(e)}
        raise


def _val(run_dir: Path, ctx: Ctx, c: dict) -> dict:
    """Val loss and perplexity of a run on the first `eval_tokens` tokens of the val split (the same
    measure as the compression table)."""
    from gptlab.compress.report import val_perplexity
    from gptlab.run import load_run

    r = val_perplexity(load_run(run_dir).model, ctx.dir("data"), eval_tokens=c.get("eval_tokens", 65536))
    return {"val_loss": r["val_loss"], "val_ppl": r["val_ppl"]}


def _cloze(run_dir: Path, ctx: Ctx, c: dict) -> dict:
    from gptlab.evaluate.harness import run_task
    from gptlab.evaluate.tasks import Task
    from gptlab.pipeline.synth import CLOZE_TASK
    from gptlab.run import load_run

    if not (ctx.dir("synth") / "cloze.jsonl").exists():
        return {}
    run = load_run(run_dir)
    task = Task.from_dict({**CLOZE_TASK, "data": {**CLOZE_TASK["data"], "test_size": c.get("cloze_n", 100)}},
                          base_dir=ctx.dir("synth"))
    return {f"{k}-shot": run_task(run.model, run.tokenizer, task, shots=k, seed=ctx.cfg.seed)["metrics"]["acc"]
            for k in c.get("shots", [0, 3])}


def _evaluate(ctx: Ctx, c: dict, resume: bool) -> dict:
    return {**_val(ctx.dir("pretrain"), ctx, c), "cloze_acc": _cloze(ctx.dir("pretrain"), ctx, c)}


# --- alignment ----------------------------------------------------------------------------------------
def _sft_data(ctx: Ctx) -> Path:
    return Path(ctx.cfg.sft.get("data") or ctx.synth("sft"))


def _pref_data(ctx: Ctx) -> Path:
    return Path(ctx.cfg.reward.get("data") or ctx.synth("preferences"))


def _sft(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.align.sft import sft

    r = sft(ctx.dir("sft"), str(_sft_data(ctx)), init_from=ctx.dir("pretrain"), epochs=c.get("epochs"),
            pack=c.get("pack", False), train={"seed": ctx.cfg.seed, **(c.get("train") or {})}, resume=resume,
            lora=c.get("lora"))
    return {k: r[k] for k in ("val_loss", "loss", "step", "n_train", "n_val") if k in r}


def _reward(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.align.reward import train_reward

    r = train_reward(ctx.dir("reward"), str(_pref_data(ctx)), init_from=ctx.dir("sft"), epochs=c.get("epochs", 1.0),
                     heldout_fraction=c.get("heldout_fraction", 0.1),
                     train={"seed": ctx.cfg.seed, **(c.get("train") or {})}, resume=resume, lora=c.get("lora"))
    return {k: r[k] for k in ("heldout_accuracy", "train_accuracy", "offset", "step") if k in r}


def _ppo(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.align.ppo import ppo
    from gptlab.pipeline.synth import judge_rewards

    use_judge = c.get("reward") == "judge"  # PPO straight against the programmatic judge, no reward model
    r = ppo(ctx.dir("ppo"), str(c.get("prompts") or ctx.synth("prompts")), actor_from=ctx.dir("sft"),
            reward_from=None if use_judge else ctx.dir("reward"), reward_fn=judge_rewards if use_judge else None,
            config={"seed": ctx.cfg.seed, **(c.get("config") or {})}, resume=resume, lora=c.get("lora"))
    return {k: r[k] for k in ("reward_before", "reward_after", "kl_after", "kl_before", "iterations", "step",
                              "ended_before", "ended_after", "samples_before", "samples_after") if k in r}


def _dpo(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.align.dpo import dpo

    r = dpo(ctx.dir("dpo"), str(_pref_data(ctx)), init_from=ctx.dir("sft"), beta=c.get("beta", 0.1),
            epochs=c.get("epochs", 1.0), train={"seed": ctx.cfg.seed, **(c.get("train") or {})}, resume=resume,
            lora=c.get("lora"))
    return {k: r[k] for k in ("heldout_reward_accuracy", "heldout_margin", "step") if k in r}


# --- compression, final evaluation, samples ---------------------------------------------------------------
def chat_models(ctx: Ctx) -> dict[str, Path]:
    """The chat models the pipeline made, by label, in report order."""
    out = {"sft": ctx.dir("sft"), "ppo": ctx.dir("ppo")}
    if ctx.cfg.dpo.get("enabled"):
        out["dpo"] = ctx.dir("dpo")
    comp = ctx.dir("compress")
    for d in sorted(comp.iterdir()) if comp.is_dir() else []:
        if (d / CONFIG_FILE).exists():
            out[f"ppo+{d.name}"] = d
    return out


def _compress(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.compress import api

    policy, data, out = ctx.dir("ppo"), ctx.dir("data"), ctx.dir("compress")  # out: emptied by the runner
    made = [policy]
    calib = {"calib_samples": c.get("calib_samples", 32)}
    if c.get("int8", True):
        made.append(api.quantize(policy, out / "int8", method="int8"))
    for s in c.get("sparsegpt", [0.5]):
        made.append(api.sparsegpt(policy, out / f"sparsegpt-{round(s * 100)}", data=data, sparsity=s, **calib))
    for s in c.get("magnitude", [0.5]):
        made.append(api.prune(policy, out / f"magnitude-{round(s * 100)}", method="magnitude", sparsity=s))
    rows = api.report(made, data=data, out=out / "report.md", eval_tokens=c.get("eval_tokens", 65536),
                      decode_tokens=c.get("decode_tokens", 64))
    return {"table": rows}


def _evaluate_final(ctx: Ctx, c: dict, resume: bool) -> dict:
    models = {"pretrain": ctx.dir("pretrain"), **chat_models(ctx)}
    out = {}
    for label, d in models.items():
        out[label] = {**_val(d, ctx, c), "cloze_acc": _cloze(d, ctx, c)}
    return {"models": out}


def _samples(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.align.data import load_prompts
    from gptlab.align.reward import RewardModel
    from gptlab.chat.template import CHAT_TOKENS, render_ids
    from gptlab.generate import Generator, SamplingParams
    from gptlab.pipeline.synth import judge
    from gptlab.run import load_run

    convs = load_prompts(str(ctx.cfg.ppo.get("prompts") or ctx.synth("prompts")))[-c.get("n", 16):]
    texts = [m[-1]["content"] for m in convs]
    rm = RewardModel.load(ctx.dir("reward"))
    params = SamplingParams(max_new_tokens=c.get("max_new_tokens", 64), temperature=c.get("temperature", 0.7),
                            top_p=c.get("top_p", 0.95), seed=ctx.cfg.seed)
    table: dict[str, dict] = {}
    for label, d in chat_models(ctx).items():
        run = load_run(d)
        gen = Generator(run.model, run.tokenizer)
        # a reply ends at <|end|> or at any role token (a model that starts a new turn has finished its own)
        stop = tuple(run.tokenizer.special_tokens[t] for t in CHAT_TOKENS)
        comps = gen.generate([render_ids(run.tokenizer, m)[0] for m in convs],
                             dataclasses.replace(params, stop_token_ids=stop))
        replies = [x.text.strip() for x in comps]
        table[label] = {"replies": replies, "rm_reward": sum(rm.score(convs, replies)) / len(replies),
                        "judge": sum(judge(p, r) for p, r in zip(texts, replies)) / len(replies),
                        "finished": sum(x.finish_reason == "stop" for x in comps) / len(comps)}
    return {"prompts": texts, "models": table}


def _serve(ctx: Ctx, c: dict, resume: bool) -> dict:
    from gptlab.serve import serve

    target = chat_models(ctx).get(c.get("model", "ppo+int8")) or ctx.dir("ppo")
    serve(target, host=c.get("host", "127.0.0.1"), port=c.get("port", 8000))
    return {"served": str(target)}


STAGES: list[Stage] = [
    Stage("tokenizer", (), _tokenizer, files=lambda ctx, c: _local(ctx.cfg.corpus)),
    Stage("prepare", ("tokenizer",), _prepare, files=lambda ctx, c: _local(ctx.cfg.corpus), out="data"),
    Stage("pretrain", ("prepare",), _pretrain, trains=True),
    Stage("synth", (), _synth, files=lambda ctx, c: _local(ctx.cfg.corpus)),
    Stage("evaluate", ("pretrain", "synth"), _evaluate, out=None),
    Stage("sft", ("pretrain", "synth"), _sft, files=lambda ctx, c: _local(c.get("data")), trains=True),
    Stage("reward", ("sft", "synth"), _reward, files=lambda ctx, c: _local(c.get("data")), trains=True),
    Stage("ppo", ("sft", "reward", "synth"), _ppo, files=lambda ctx, c: _local(c.get("prompts")), trains=True),
    Stage("dpo", ("sft", "synth"), _dpo, files=lambda ctx, c: _local(ctx.cfg.reward.get("data")),
          enabled=lambda ctx, c: bool(c.get("enabled")), trains=True),
    Stage("compress", ("ppo", "prepare"), _compress),
    Stage("evaluate_final", ("evaluate", "compress", "dpo"), _evaluate_final, out=None),
    Stage("samples", ("compress", "dpo", "reward"), _samples, out=None),
    Stage("serve", ("compress",), _serve, enabled=lambda ctx, c: bool(c.get("enabled")), out=None),
]
# the config section each stage reads (the rest read their own name)
SECTION = {"evaluate_final": "evaluate"}
STAGE_NAMES = [s.name for s in STAGES]


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise GptlabError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
