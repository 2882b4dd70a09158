"""`gptlab info RUN_DIR`: describe a run directory. `gptlab lora merge`: a base run + a LoRA adapter -> a run."""

from __future__ import annotations

import json


def cmd_info(a) -> None:
    from gptlab.model import GPTConfig
    from gptlab.run import describe_run

    info = describe_run(a.run_dir)
    if a.json:
        print(json.dumps(info, indent=2))
        return
    m = GPTConfig.from_dict(info["model"])
    print(f"{info['run_dir']}: {info['stage'] or '?'} run, {info['parameters'] / 1e6:.2f}M parameters")
    print(f"  model: {m.n_layer} layers × {m.n_embd} ({m.n_head} heads), context {m.block_size}, "
          f"{m.norm}-LN, attention {','.join(m.attention)}, vocab {m.vocab_size}")
    print(f"  tokenizer: {info['tokenizer']['kind']}, {info['tokenizer']['vocab_size']:,} tokens")
    print(f"  latest checkpoint: {info['latest_checkpoint']}; last val loss: {info['last_val_loss']}")
    if info["task"]:
        task = info["task"]
        print(f"  fine-tuned task: {task.get('type')} · labels {task.get('labels')} · λ {task.get('lm_coef')}")


def cmd_lora_merge(a) -> None:
    from gptlab.run.adapter import merge_adapter

    out = merge_adapter(a.adapter, a.base, a.out)
    print(f"merged {a.adapter} into {a.base}: {out} (try: gptlab chat {out})")


def register(sub) -> None:
    lo = sub.add_parser("lora", help="LoRA adapters: merge one into its base model")
    lsub = lo.add_subparsers(dest="lora_cmd", required=True)
    m = lsub.add_parser("merge", help="base run + adapter -> a run dir with the merged weights (W + (α/r)·B·A)")
    m.add_argument("adapter", help="a LoRA run directory (trained with --lora.r), or a PEFT adapter directory")
    m.add_argument("--base", required=True, help="the run the adapter was trained over")
    m.add_argument("--out", required=True, help="run directory to write")
    m.set_defaults(func=cmd_lora_merge)

    i = sub.add_parser("info", help="describe a run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
