"""`gptlab generate` (the KV-cache generator) and `gptlab sample` (the simple full-recompute sampler)."""

from __future__ import annotations

import sys
from pathlib import Path

from gptlab.config import add_dtype_arg, positive_int
from gptlab.errors import GptlabError


def cmd_sample(a) -> None:
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


def sampling_params(a):
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


def cmd_generate(a) -> None:
    import warnings

    params = sampling_params(a)
    prompts = [a.prompt] if a.prompt is not None else []
    if a.file:
        try:
            text = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"cannot read prompts from {a.file}: {e}") from None
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        prompts = [""]
    run, gen = _load_generator(a)
    if hasattr(run.tokenizer, "codecs"):  # an omni model: chat turns with media in and out
        return _generate_omni(a, gen, prompts, params)
    if a.image or a.audio:
        raise GptlabError(f"{a.run_dir} reads text only: --image and --audio need an omni model")
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


def _generate_omni(a, gen, prompts: list[str], params) -> None:
    """Each prompt a user turn (with --image/--audio attached); replies' text printed, media saved in --out-dir."""
    import dataclasses

    from gptlab.chat.template import CHAT_TOKENS, render_ids
    from gptlab.generate.spans import split_reply
    from gptlab.omni.media import load_part, save_reply_media

    tok = gen.tok
    media = [load_part({"type": k, "path": p}, f"--{k}") for k, p in (("image", a.image), ("audio", a.audio)) if p]
    params = dataclasses.replace(params, stop_token_ids=tuple(tok.special_tokens[t] for t in CHAT_TOKENS))
    ids = [render_ids(tok, [{"role": "user", "content": [{"type": "text", "text": pr}, *media]}])[0] for pr in prompts]
    for j, out in enumerate(gen.generate(ids, params, num_samples=a.num_samples)):
        parts = split_reply(tok, out.token_ids)
        paths = iter(save_reply_media(parts, a.out_dir, f"sample{j:03d}"))
        print(" ".join(p["text"] if p["type"] == "text" else f"[{p['type']} saved to {next(paths)}]" for p in parts))


def _replace_seed(params, seed):
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def add_sampling_args(p, temperature: float = 1.0, max_new: int = 128) -> None:
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


def register(sub) -> None:
    s = sub.add_parser("sample", help="sample text from a run (simple sampler; see `generate` for the real one)")
    s.add_argument("run_dir")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--num-samples", type=positive_int, default=1)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="cpu")
    add_dtype_arg(s)
    s.set_defaults(func=cmd_sample)

    g = sub.add_parser("generate", help="generate text with the KV-cache generator")
    g.add_argument("run_dir")
    g.add_argument("--prompt", help="prompt text (default: start of a new document)")
    g.add_argument("--file", help="a file of prompts, one per line, decoded together in one batch")
    g.add_argument("--num-samples", type=positive_int, default=1)
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--image", help="omni models: an image (PNG/JPEG) for the prompt")
    g.add_argument("--audio", help="omni models: speech (WAV/FLAC) for the prompt")
    g.add_argument("--out-dir", default="generated", help="omni models: where image and audio replies are saved")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
