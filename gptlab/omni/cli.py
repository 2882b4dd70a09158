"""`gptlab omni-data`: build the embedded omni corpus (digits + eSpeak speech) and its tokenizers;
`gptlab omni-eval`: the omni figures of a run on a corpus's held-out split."""

from __future__ import annotations

import json

from gptlab.config import positive_int


def cmd_omni_data(a) -> None:
    from gptlab.omni.corpus import build_corpus
    from gptlab.run.lock import RunLock

    with RunLock(a.out):
        build_corpus(a.out, per_task=a.per_task, test_per_task=a.test_per_task, seed=a.seed,
                     image_codes=a.image_codes, image_patch=a.image_patch, audio_codes=a.audio_codes)
    print(f"next: gptlab sft --preset small-4x128 --tokenizer {a.out}/tokenizer.gptlab.json --data {a.out}/train.jsonl "
          "--out runs/omni --model.block_size 256")


def cmd_omni_eval(a) -> None:
    from gptlab.omni.evaluate import evaluate_omni

    report = evaluate_omni(a.run_dir, a.data, limit=a.limit, out_dir=a.out)
    print(json.dumps(report, indent=1))


def register(sub) -> None:
    d = sub.add_parser("omni-data", help="build the embedded omni corpus: digit images and eSpeak speech as chat "
                                         "examples in every direction, with its image, audio and omni tokenizers")
    d.add_argument("--out", required=True, help="folder to create")
    d.add_argument("--per-task", type=positive_int, default=1000, help="training examples per task [default: 1000]")
    d.add_argument("--test-per-task", type=positive_int, default=50, help="held-out examples per task [default: 50]")
    d.add_argument("--image-codes", type=positive_int, default=16,
                   help="image codebook size [default: 16 grey levels: Image GPT's palette]")
    d.add_argument("--image-patch", type=positive_int, default=1,
                   help="image patch side: 1 = a token per pixel (64 per digit), 2 = 16 per digit [default: 1]")
    d.add_argument("--audio-codes", type=positive_int, default=1024,
                   help="speech codebook size [default: 1024: half the word errors of 512 after decoding]")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_omni_data)
    e = sub.add_parser("omni-eval", help="judge an omni run on a corpus's held-out images and voice")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="the omni-data folder")
    e.add_argument("--limit", type=positive_int, help="examples per task")
    e.add_argument("--out", help="folder for omni_eval.json (every reply)")
    e.set_defaults(func=cmd_omni_eval)
