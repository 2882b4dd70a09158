"""`gptlab info RUN_DIR`: describe a run directory."""

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


def register(sub) -> None:
    i = sub.add_parser("info", help="describe a run directory")
    i.add_argument("run_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
