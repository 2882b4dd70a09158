"""The omni figures (issue 15): one GPT trained from scratch on the embedded corpus (scikit-learn's digits,
eSpeak NG speech), judged on held-out images and a held-out voice by models gptlab does not train, and the
time to the first audio chunk of a spoken reply through `gptlab serve`.

    python benchmarks/omni.py [--out runs/omni-bench] [--steps 3000]

Prints one table (and writes OUT/omni_report.json, OUT/omni_digits.png): per task the measured accuracy,
the target and the judge's ceiling on real data; the tokenizers' reconstruction; the one model's
parameters; the latency p50/p90 at one client. The whole run takes about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gptlab.align.sft import sft
from gptlab.chat.template import END, render_ids
from gptlab.generate import Generator, SamplingParams
from gptlab.generate.spans import split_reply
from gptlab.omni.corpus import WORDS, build_corpus, split_digits
from gptlab.omni.evaluate import evaluate_omni
from gptlab.omni.judges import DigitJudge
from gptlab.omni.media import png_bytes, wav_bytes
from gptlab.run import load_run
from gptlab.runtime import describe_cpu
from gptlab.tokenizer.image import psnr

MODEL = {"n_layer": 4, "n_head": 6, "n_embd": 192, "block_size": 256, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
         "resid_pdrop": 0.0}
TARGETS = {"image_to_text": 0.90, "text_to_image": 0.80, "speech_to_text": 0.90, "text_to_speech": None,
           "image_speech_to_speech": 0.80, "mixed": None}


def digit_grid(run_dir: Path, data: Path, out: Path, per_class: int = 8) -> float:
    """Sampled "Draw a N." replies, one row per digit, as a PNG; -> the judge's accuracy on them."""
    from PIL import Image

    run = load_run(run_dir)
    tok = run.tokenizer
    meta = json.loads((data / "meta.json").read_text())
    images, labels, held = split_digits(meta["seed"])
    judge = DigitJudge(images[~held], labels[~held])
    gen = Generator(run.model, tok, dtype="auto", rows=per_class)
    params = SamplingParams(max_new_tokens=tok.codecs["image"].tokens_per_item + 8, temperature=1.0, seed=0,
                            stop_token_ids=(tok.special_tokens[END],),
                            modalities=("text", "image"))
    grid = np.zeros((10 * 9, per_class * 9), np.float32)
    right = 0
    for d, word in enumerate(WORDS):
        prompt = render_ids(tok, [{"role": "user", "content": [{"type": "text", "text": f"Draw a {word}."}]}])[0]
        for k, c in enumerate(gen.generate([prompt], params, num_samples=per_class)):
            ims = [p["image"] for p in split_reply(tok, c.token_ids) if p["type"] == "image"]
            if ims:
                grid[d * 9:d * 9 + 8, k * 9:k * 9 + 8] = ims[0]
                right += judge(ims[0]) == d
    Image.open(__import__("io").BytesIO(png_bytes(grid, scale=6))).save(out)
    return right / (10 * per_class)


def latency(run_dir: Path, data: Path, n: int = 20) -> dict:
    """Time from sending a request to the first delta.audio chunk, one client at a time: spoken questions
    with a picture (image + speech -> speech, as GPT-4o's 232 ms is for audio input)."""
    import httpx

    rows = [json.loads(ln) for ln in (data / "test.jsonl").read_text().splitlines()
            if json.loads(ln)["task"] == "image_speech_to_speech"][:n]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run_dir), "--port", str(port),
                             "--model-name", "omni", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        times = []
        for i, r in enumerate([rows[0], *rows]):  # the first request warms up and is not counted
            parts = r["messages"][0]["content"]
            img = (data / parts[0]["path"]).read_bytes()
            import soundfile as sf

            wave, sr = sf.read(data / parts[1]["path"], dtype="float32")
            body = {"model": "omni", "modalities": ["text", "audio"], "audio": {"voice": "omni", "format": "pcm16"},
                    "stream": True, "temperature": 0, "max_tokens": 120,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(img).decode()}},
                        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(wave, sr)).decode(),
                                                                "format": "wav"}}]}]}
            t0 = time.perf_counter()
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    if '"data"' in line and '"audio"' in line:
                        if i:
                            times.append(time.perf_counter() - t0)
                        break
        times.sort()
        return {"n": len(times), "p50_ms": 1000 * statistics.median(times), "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))]}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/omni-bench")
    ap.add_argument("--data", help="an existing omni-data folder (default: build one in OUT/data)")
    ap.add_argument("--steps", type=int, default=2300)
    ap.add_argument("--per-task", type=int, default=3000)
    ap.add_argument("--test-per-task", type=int, default=100)
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.perf_counter()
    data = Path(a.data) if a.data else out / "data"
    if not a.data:
        build_corpus(data, per_task=a.per_task, test_per_task=a.test_per_task)
    t_data = time.perf_counter() - t0
    run = out / "run"
    if not (run / "model.safetensors").exists():
        sft(run, str(data / "train.jsonl"), preset_name="small-4x128", tokenizer=data / "tokenizer.gptlab.json",
            model_overrides=MODEL, val_fraction=0.02,
            train={"max_iters": a.steps, "batch_size": 32, "lr": 2e-3, "warmup_iters": 50, "log_interval": 50,
                   "eval_interval": 1000})
    t_train = time.perf_counter() - t0 - t_data
    report = evaluate_omni(run, data, out_dir=out)
    report["text_to_image_grid"] = digit_grid(run, data, out / "omni_digits.png")
    report["latency_first_audio_chunk"] = latency(run, data)
    tok = load_run(run).tokenizer
    images, labels, held = split_digits(json.loads((data / "meta.json").read_text())["seed"])
    codec = tok.codecs["image"]
    back = np.stack([codec.decode(codec.encode(x)) for x in images[held]])
    report["image_tokenizer_psnr_db"] = psnr(images[held], back)  # over all held-out pixels (one image may be exact)
    model = load_run(run).model
    report["parameters"] = model.num_params()
    report["seconds"] = {"data": t_data, "train": t_train, "total": time.perf_counter() - t0}
    report["cpu"] = describe_cpu()
    (out / "omni_report.json").write_text(json.dumps(report, indent=1))

    c = report["ceilings"]
    print(f"\nomni on {report['cpu']} · one GPT of {report['parameters'] / 1e6:.2f}M parameters (tokenizers: a "
          f"{codec.n_codes}-code {codec.patch}×{codec.patch}-patch image codebook, a {tok.codecs['audio'].n_codes}-code log-mel speech "
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
    print(f"first audio chunk through gptlab serve (image + speech in, 1 client, n={lat['n']}): p50 "
          f"{lat['p50_ms']:.0f} ms, p90 {lat['p90_ms']:.0f} ms (GPT-4o: 232 ms average for audio input, target ≤ 300 ms)")
    s = report["seconds"]
    print(f"time: data {s['data']:.0f} s, training {s['train']:.0f} s, total {s['total']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
