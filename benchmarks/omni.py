"""The omni figures (issue 15): one GPT trained from scratch on the embedded corpus (scikit-learn's digits,
eSpeak NG speech), judged on held-out images and a held-out voice by models gptlab does not train, and the
time to the first audio chunk of a spoken reply through `gptlab serve`.

    python benchmarks/omni.py [--out runs/omni-bench] [--steps 2300]

The measurements are `gptlab reproduce gpt4o`'s (gptlab/reproduce/gpt4o.py); this prints them as one table.

Prints one table (and writes OUT/omni_report.json, OUT/omni_digits.png): per task the measured accuracy,
the target and the judge's ceiling on real data; the tokenizers' reconstruction; the one model's
parameters; the latency p50/p90 at one client. The whole run takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gptlab.reproduce.gpt4o import SCALES, TARGETS, measure
from gptlab.runtime import describe_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/omni-bench")
    ap.add_argument("--steps", type=int, default=SCALES["cpu"]["steps"])
    ap.add_argument("--per-task", type=int, default=SCALES["cpu"]["per_task"])
    ap.add_argument("--test-per-task", type=int, default=SCALES["cpu"]["test_per_task"])
    a = ap.parse_args()
    out = Path(a.out)
    report = measure(out, dict(SCALES["cpu"], steps=a.steps, per_task=a.per_task, test_per_task=a.test_per_task))
    c = report["ceilings"]
    print(f"\nomni on {describe_cpu()} · one GPT of {report['parameters'] / 1e6:.2f}M parameters (tokenizers: a "
          f"{report['image_codes']}-code image codebook, a {report['audio_codes']}-code log-mel speech "
          f"codebook + Griffin-Lim, characters for text; no other model)")
    print(f"{'task':<24} {'accuracy':>9} {'target':>9}  judge ceiling on real data")
    for task, target in TARGETS.items():
        ceil = (c["digit_judge_on_real_heldout_digits"] if task == "text_to_image" else
                c.get(f"speech_judge_on_real_speech:{task}"))
        trip = c.get(f"speech_judge_on_tokenizer_round_trip:{task}")
        tgt = f"{target:.0%}" if target else ("≥80% ceil" if task == "text_to_speech" else "-")
        said = report[task].get("transcript_accuracy")
        print(f"{task:<24} {report[task]['accuracy']:>9.1%} {tgt:>9}  {'' if ceil is None else f'{ceil:.1%}'}"
              + ("" if trip is None else f" (through the speech tokenizer and back: {trip:.1%})")
              + ("" if said is None else f"; the reply's transcript: {said:.1%}"))
    print(f"{'text_to_image (grid)':<24} {report['text_to_image_grid']:>9.1%}   sampled at T=1, {out / 'omni_digits.png'}")
    print(f"image tokenizer PSNR on held-out digits: {report['image_tokenizer_psnr_db']:.1f} dB")
    lat = report["latency_first_audio_chunk"]
    if lat and lat["n"]:
        print(f"first audio chunk through gptlab serve (image + speech in, 1 client, n={lat['n']}): p50 "
              f"{lat['p50_ms']:.0f} ms, p90 {lat['p90_ms']:.0f} ms (GPT-4o: 232 ms average for audio input, target ≤ 300 ms)")
    s = report["seconds"]
    print(f"time: data {s['data']:.0f} s, training {s['train']:.0f} s, total {s['total']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
