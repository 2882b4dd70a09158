"""`gptlab` command line. Each subcommand is a thin shell over a library function; bad input ends in a
one-line `error: ...` and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gptlab.config import add_dtype_arg
from gptlab.errors import GptlabError


def _cmd_tokenizer(a) -> None:
    from gptlab.tokenizer import build_tokenizer, load_tokenizer

    if a.tok_cmd == "train":
        from gptlab.data.sources import iter_documents

        spec = "char" if a.kind == "char" else ("gpt2" if a.kind == "gpt2" else f"bpe:{a.merges}")
        tok = build_tokenizer(spec, list(iter_documents(a.input, text_field=a.text_field)))
        out = Path(a.out)
        tok.save(out)
        print(f"saved {tok.kind} tokenizer with {tok.vocab_size:,} tokens to {out}")
    elif a.tok_cmd == "encode":
        tok = load_tokenizer(a.tokenizer)
        text = a.text if a.text is not None else sys.stdin.read()
        print(" ".join(map(str, tok.encode(text))))
    else:
        tok = load_tokenizer(a.tokenizer)
        raw = a.ids if a.ids else sys.stdin.read().split()
        try:
            ids = [int(t) for t in raw]
        except ValueError:
            raise GptlabError("decode expects integer token ids") from None
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise GptlabError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
        sys.stdout.write(tok.decode(ids) + "\n")


def _cmd_prepare(a) -> None:
    from gptlab.data.prepare import prepare

    prepare(a.source, a.out, tokenizer=a.tokenizer, val_fraction=a.val_fraction, seed=a.seed,
            num_workers=a.workers, text_field=a.text_field)


def _cmd_pretrain(a) -> None:
    from gptlab.config import read_config, section_layer
    from gptlab.model import GPTConfig
    from gptlab.train.config import TrainConfig
    from gptlab.pretrain import pretrain

    y = read_config(a.config, ("model", "train"), top=("data", "out", "preset", "recipe"))
    data, out = a.data or y.get("data"), a.out or y.get("out")
    if not data or not out:
        raise GptlabError("pretrain needs --data (a prepared data dir) and --out (the run dir)")
    pretrain(data, out, preset_name=a.preset or y.get("preset", "small-4x128"), recipe=a.recipe or y.get("recipe", "nanogpt"),
             model_overrides=section_layer(a, y, GPTConfig, "model"),
             train_layers=(section_layer(a, y, TrainConfig, "train"),), resume=a.resume)


def _cmd_sample(a) -> None:
    import torch

    from gptlab.run import load_run
    from gptlab.runtime import autocast, linear_shape, resolve_dtype
    from gptlab.sample import sample

    run = load_run(a.run_dir, device=a.device)
    tok, model = run.tokenizer, run.model
    ids = tok.encode(a.prompt) if a.prompt else [tok.eot_id]
    if len(ids) >= model.cfg.block_size:
        print(f"warning: prompt of {len(ids)} tokens cropped to the last {model.cfg.block_size - 1}", file=sys.stderr)
        ids = ids[-(model.cfg.block_size - 1):]
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    x = torch.tensor([ids] * a.num_samples, device=a.device)
    with autocast(a.device, resolve_dtype(a.dtype, a.device, linear_shape(model, a.num_samples))):
        out = sample(model, x, a.max_new_tokens, a.temperature, a.top_k, generator=g)
    for i, row in enumerate(out.tolist()):
        text = tok.decode(row[len(ids):])
        print((a.prompt or "") + text)
        if i < a.num_samples - 1:
            print("-" * 40)


def _sampling_params(a):
    from gptlab.generate import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          no_repeat_ngram_size=a.no_repeat_ngram_size, stop=tuple(a.stop), seed=a.seed,
                          num_beams=a.num_beams, length_penalty=a.length_penalty, strict=a.strict)


def _load_generator(a):
    from gptlab.generate import Generator
    from gptlab.run import load_run

    run = load_run(a.run_dir, device=a.device)
    return run, Generator(run.model, run.tokenizer, dtype=a.dtype)


def _cmd_generate(a) -> None:
    import warnings

    params = _sampling_params(a)
    prompts = [a.prompt] if a.prompt is not None else []
    if a.file:
        try:
            text = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"cannot read prompts from {a.file}: {e}") from None
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        prompts = [""]
    _, gen = _load_generator(a)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *rest: print(f"warning: {msg}", file=sys.stderr)
        if a.stream:
            for i, pr in enumerate(prompts):
                for k in range(a.num_samples):  # sample k uses seed + k, as in batch mode
                    p = params if params.seed is None else _replace_seed(params, params.seed + k)
                    sys.stdout.write(pr)
                    for delta in gen.stream(pr, p):
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                    sys.stdout.write("\n" + ("-" * 40 + "\n" if (i, k) != (len(prompts) - 1, a.num_samples - 1) else ""))
            return
        outs = gen.generate(prompts, params, num_samples=a.num_samples)
    for j, out in enumerate(outs):
        print(prompts[j // a.num_samples] + out.text)
        if j < len(outs) - 1:
            print("-" * 40)


def _replace_seed(params, seed):
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def _cmd_chat(a) -> None:
    from gptlab.chat import CHAT_TOKENS, ensure_chat_tokens, run_chat
    from gptlab.generate import Generator
    from gptlab.run import load_run

    run = load_run(a.run_dir, device=a.device)
    if not all(t in run.tokenizer.special_tokens for t in CHAT_TOKENS):
        print("warning: this run was not fine-tuned for chat (no chat tokens); replies may ramble until "
              "--max-new-tokens", file=sys.stderr)
    tok = ensure_chat_tokens(run.tokenizer, run.model)  # before the Generator: may grow the embeddings
    gen = Generator(run.model, tok, dtype=a.dtype)
    run_chat(gen, tok, run.model.cfg.block_size, _sampling_params(a), system=a.system)


def _cmd_info(a) -> None:
    from gptlab.model import GPTConfig
    from gptlab.run import read_run_config
    from gptlab.tokenizer import load_tokenizer
    from gptlab.train.checkpoint import CheckpointManager
    from gptlab.train.metrics import read_metrics

    run_dir = Path(a.run_dir)
    cfg = read_run_config(run_dir)
    mcfg = GPTConfig.from_dict(cfg["model"])
    tok = load_tokenizer(run_dir / cfg.get("tokenizer", "tokenizer.gptlab.json"))
    latest = CheckpointManager(run_dir).latest()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    vals = [m for m in metrics if "val_loss" in m]
    info = {
        "run_dir": str(run_dir), "stage": cfg.get("stage"), "parameters": mcfg.num_params(),
        "model": cfg["model"], "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
        "latest_checkpoint": latest.name if latest else None,
        "last_val_loss": vals[-1]["val_loss"] if vals else None,
        "train": cfg.get("train"),
        "task": cfg.get("task"),
    }
    if a.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{run_dir}: {cfg.get('stage', '?')} run, {mcfg.num_params() / 1e6:.2f}M parameters")
    print(f"  model: {mcfg.n_layer} layers × {mcfg.n_embd} ({mcfg.n_head} heads), context {mcfg.block_size}, "
          f"{mcfg.norm}-LN, attention {','.join(mcfg.attention)}, vocab {mcfg.vocab_size}")
    print(f"  tokenizer: {tok.kind}, {tok.vocab_size:,} tokens")
    print(f"  latest checkpoint: {info['latest_checkpoint']}; last val loss: {info['last_val_loss']}")
    if info["task"]:
        task = info["task"]
        print(f"  fine-tuned task: {task.get('type')} · labels {task.get('labels')} · λ {task.get('lm_coef')}")


def _add_sampling_args(p, temperature: float = 1.0, max_new: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (GPT-3 used 4)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length ** α (GPT-3 used 0.6)")
    p.add_argument("--strict", action="store_true", help="refuse prompts longer than the context instead of cropping")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)


def build_parser() -> argparse.ArgumentParser:
    from gptlab.config import add_dataclass_args
    from gptlab.model import GPTConfig, PRESETS
    from gptlab.train.config import RECIPES, TrainConfig

    p = argparse.ArgumentParser(prog="gptlab", description="The GPT lineage end to end.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tokenizer", help="train, or encode/decode with, a tokenizer")
    tsub = t.add_subparsers(dest="tok_cmd", required=True)
    tt = tsub.add_parser("train", help="build a tokenizer from a corpus (byte-level BPE, char) or the GPT-2 BPE")
    tt.add_argument("input", help="corpus: file, folder, .jsonl, hf:NAME or 'shakespeare'")
    tt.add_argument("--out", required=True, help="tokenizer file to write (tokenizer.gptlab.json)")
    tt.add_argument("--kind", choices=["bpe", "char", "gpt2"], default="bpe")
    tt.add_argument("--merges", type=int, default=8000, help="BPE merges (GPT-1 used 40,000)")
    tt.add_argument("--text-field", default="text", help="JSONL field holding the text")
    te = tsub.add_parser("encode", help="print token ids of --text (or stdin)")
    te.add_argument("tokenizer", help="tokenizer file, run dir or data dir")
    te.add_argument("--text")
    td = tsub.add_parser("decode", help="print the text of token ids (arguments or stdin)")
    td.add_argument("tokenizer")
    td.add_argument("ids", nargs="*")

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    pr.add_argument("source", help="text file, folder, .jsonl, hf:NAME[:CONFIG] or 'shakespeare' (built-in)")
    pr.add_argument("--out", required=True, help="data directory to write")
    pr.add_argument("--tokenizer", default="gpt2", help="gpt2 | char | bpe:N (train N merges) | path to a tokenizer")
    pr.add_argument("--val-fraction", type=float, default=0.1)
    pr.add_argument("--seed", type=int, default=1337)
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count, ≤ 8)")
    pr.add_argument("--text-field", default="text", help="JSONL / datasets field holding the text")

    pt = sub.add_parser("pretrain", help="generative pretraining (one process, or several under torchrun)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pt.add_argument("--config", help="YAML with keys data, out, preset, recipe, model: {...}, train: {...}")
    pt.add_argument("--data", help="prepared data directory (gptlab prepare)")
    pt.add_argument("--out", help="run directory")
    pt.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)} [default: small-4x128]")
    pt.add_argument("--recipe", help=f"training recipe: {', '.join(RECIPES)} [default: nanogpt, sized for short runs; "
                                     "gpt1/gpt3 use the papers' schedules, sized for billions of tokens]")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_dataclass_args(pt, GPTConfig, "model")
    add_dataclass_args(pt, TrainConfig, "train")

    s = sub.add_parser("sample", help="sample text from a run (simple sampler; see `generate` for the real one)")
    s.add_argument("run_dir")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="cpu")
    add_dtype_arg(s)

    g = sub.add_parser("generate", help="generate text with the KV-cache generator")
    g.add_argument("run_dir")
    g.add_argument("--prompt", help="prompt text (default: start of a new document)")
    g.add_argument("--file", help="a file of prompts, one per line, decoded together in one batch")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_args(g)

    c = sub.add_parser("chat", help="multi-turn chat (commands: /reset, /system TEXT, /quit)")
    c.add_argument("run_dir")
    c.add_argument("--system", help="system message")
    _add_sampling_args(c, temperature=0.7, max_new=256)

    from gptlab.interop.cli import add_convert_parser

    add_convert_parser(sub)
    from gptlab.evaluate.cli import add_evaluate_parser
    from gptlab.finetune.cli import add_classify_parser, add_finetune_parser

    add_evaluate_parser(sub)
    add_finetune_parser(sub)
    add_classify_parser(sub)
    from gptlab.compress.cli import add_compress_parser

    add_compress_parser(sub)
    from gptlab.align.cli import add_dpo_parser, add_reward_parser, add_sft_parser

    add_sft_parser(sub)
    add_reward_parser(sub)
    add_dpo_parser(sub)
    from gptlab.align.ppo_cli import add_ppo_parser, add_rlhf_parser

    add_ppo_parser(sub)
    add_rlhf_parser(sub)

    from gptlab.pipeline.cli import add_pipeline_parser

    add_pipeline_parser(sub)

    from gptlab.serve.cli import add_serve_parser

    add_serve_parser(sub)

    i = sub.add_parser("info", help="describe a run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true")
    return p


# the core commands; the later stages' parsers carry their handler (set_defaults(func=...))
COMMANDS = {"tokenizer": _cmd_tokenizer, "prepare": _cmd_prepare, "pretrain": _cmd_pretrain,
            "sample": _cmd_sample, "generate": _cmd_generate, "chat": _cmd_chat, "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        (getattr(args, "func", None) or COMMANDS[args.cmd])(args)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
