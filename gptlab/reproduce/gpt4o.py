"""GPT-4o (OpenAI, 2024) at laptop scale: one model, trained end to end, takes any mix of text, images and
audio and answers with any mix of them, quickly enough to talk to.

cpu: the embedded omni corpus (`gptlab omni-data`: scikit-learn's handwritten digits and eSpeak NG speech, six
directions: image → text, text → image, speech → text, text → speech, image + speech → speech, one reply mixing
image, speech and text; a fifth of the images and one voice held out) and one GPT trained on it from scratch by
`gptlab sft`. Judged on the held-out split by models gptlab does not train (an SVM on the real digits reads
generated images; PocketSphinx transcribes generated speech), beside those judges' ceilings on real data; the
time to the first audio chunk of a spoken answer through `gptlab serve`. `benchmarks/omni.py` runs this recipe.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gptlab.fileio import atomic_write_json, read_json
from gptlab.reproduce.report import Claim, Reproduction

PAPER = ("OpenAI, Hello GPT-4o (May 2024) and the GPT-4o System Card (2024): one model end to end across text, "
         "vision and audio")
SUMMARY = ("one GPT from scratch on digits and speech: image/speech in, image/speech/text out, judged by models "
           "gptlab does not train; first-audio latency through the server (~20 min)")
MODEL = {"n_layer": 4, "n_head": 6, "n_embd": 192, "block_size": 256, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
         "resid_pdrop": 0.0}
_CPU = dict(per_task=3000, test_per_task=100, model=MODEL, steps=2300, batch=32, lr=2e-3, latency_n=20)
SCALES = {
    "cpu": _CPU,
    "gpu": dict(_CPU, per_task=10000, test_per_task=300, model=dict(MODEL, n_layer=8, n_head=8, n_embd=512),
                steps=10000, lr=1e-3),
    # a two-minute end-to-end check of the recipe (its numbers mean nothing)
    "smoke": dict(_CPU, per_task=20, test_per_task=3, model=dict(MODEL, n_layer=1, n_head=2, n_embd=32), steps=6,
                  batch=4, latency_n=2),
}
TARGETS = {"image_to_text": 0.90, "text_to_image": 0.80, "speech_to_text": 0.90, "text_to_speech": None,
           "image_speech_to_speech": 0.80, "mixed": None}
NAMES = {"image_to_text": "image → text (\"What digit is this?\")", "text_to_image": "text → image (\"Draw a seven.\")",
         "speech_to_text": "speech → text, word accuracy", "text_to_speech": "text → speech, word accuracy",
         "image_speech_to_speech": "image + speech → speech", "mixed": "one reply with image + speech + text, all right"}


def train(out: Path, s: dict, quiet: bool) -> tuple[Path, Path, dict]:
    """The corpus and the one model, cached -> (data folder, run folder, seconds spent on each)."""
    from gptlab.align.sft import sft
    from gptlab.omni.corpus import build_corpus

    data, run, times = out / "data", out / "run", {}
    t0 = time.perf_counter()
    if not (data / "meta.json").is_file():
        if data.exists():  # a cut build: start it again
            import shutil

            shutil.rmtree(data)
        build_corpus(data, per_task=s["per_task"], test_per_task=s["test_per_task"], quiet=quiet)
    times["data"] = time.perf_counter() - t0
    if not (run / "model.safetensors").exists():
        sft(run, str(data / "train.jsonl"), preset_name="small-4x128", tokenizer=data / "tokenizer.gptlab.json",
            model_overrides=s["model"], val_fraction=0.02, quiet=quiet, resume=(run / "latest.json").exists(),
            train={"max_iters": s["steps"], "batch_size": s["batch"], "lr": s["lr"], "warmup_iters": 50,
                   "log_interval": 50, "eval_interval": 1000})
    times["train"] = time.perf_counter() - t0 - times["data"]
    return data, run, times


def digit_grid(run_dir: Path, data: Path, out: Path, per_class: int = 8) -> float:
    """Sampled "Draw a N." replies (T = 1), one row per digit, as a PNG -> the judge's accuracy on them."""
    from PIL import Image

    from gptlab.chat.template import END, render_ids
    from gptlab.generate import Generator, SamplingParams
    from gptlab.generate.spans import split_reply
    from gptlab.omni.corpus import WORDS, split_digits
    from gptlab.omni.judges import DigitJudge
    from gptlab.omni.media import png_bytes
    from gptlab.run import load_run

    run = load_run(run_dir)
    tok = run.tokenizer
    images, labels, held = split_digits(read_json(data / "meta.json", "omni corpus")["seed"])
    judge = DigitJudge(images[~held], labels[~held])
    gen = Generator(run.model, tok, dtype="auto", rows=per_class)
    params = SamplingParams(max_new_tokens=tok.codecs["image"].tokens_per_item + 8, temperature=1.0, seed=0,
                            stop_token_ids=(tok.special_tokens[END],), modalities=("text", "image"))
    grid = np.zeros((10 * 9, per_class * 9), np.float32)
    right = 0
    for d, word in enumerate(WORDS):
        prompt = render_ids(tok, [{"role": "user", "content": [{"type": "text", "text": f"Draw a {word}."}]}])[0]
        for k, c in enumerate(gen.generate([prompt], params, num_samples=per_class)):
            ims = [p["image"] for p in split_reply(tok, c.token_ids) if p["type"] == "image"]
            if ims:
                grid[d * 9:d * 9 + 8, k * 9:k * 9 + 8] = ims[0]
                right += judge(ims[0]) == d
    Image.open(io.BytesIO(png_bytes(grid, scale=6))).save(out)
    return right / (10 * per_class)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latency(run_dir: Path, data: Path, n: int = 20) -> dict | None:
    """Seconds from sending a request to the first delta.audio chunk, one client at a time: a picture and a
    spoken question in, speech out (GPT-4o's 232 ms is for audio input). None without `gptlab[serve]`."""
    import importlib.util
    import urllib.request

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return None
    import soundfile as sf

    from gptlab.omni.media import wav_bytes

    rows = [r for r in map(json.loads, (data / "test.jsonl").read_text().splitlines())
            if r["task"] == "image_speech_to_speech"][:n]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run_dir), "--port", str(port),
                             "--model-name", "omni", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        times = []
        for i, r in enumerate([rows[0], *rows]):  # the first request warms up and is not counted
            parts = r["messages"][0]["content"]
            wave, sr = sf.read(data / parts[1]["path"], dtype="float32")
            body = {"model": "omni", "modalities": ["text", "audio"], "audio": {"voice": "omni", "format": "pcm16"},
                    "stream": True, "temperature": 0, "max_tokens": 120, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                            base64.b64encode((data / parts[0]["path"]).read_bytes()).decode()}},
                        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(wave, sr)).decode(),
                                                                "format": "wav"}}]}]}
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                for line in resp:
                    if b'"data"' in line and b'"audio"' in line:
                        if i:
                            times.append(time.perf_counter() - t0)
                        break
        times.sort()
        if not times:  # the model answered without speech (an untrained one does)
            return {"n": 0, "p50_ms": None, "p90_ms": None}
        return {"n": len(times), "p50_ms": 1000 * statistics.median(times),
                "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))]}
    finally:
        proc.terminate()
        proc.wait(10)


def measure(out: Path, s: dict, quiet: bool = False) -> dict:
    """Train (cached), judge every task on the held-out split, draw the digit grid, time the first audio chunk."""
    from gptlab.omni.evaluate import evaluate_omni
    from gptlab.run import load_run
    from gptlab.tokenizer.image import psnr
    from gptlab.omni.corpus import split_digits

    t0 = time.perf_counter()
    data, run, times = train(out, s, quiet)
    report = evaluate_omni(run, data, out_dir=out)
    report["text_to_image_grid"] = digit_grid(run, data, out / "omni_digits.png")
    report["latency_first_audio_chunk"] = latency(run, data, s["latency_n"])
    loaded = load_run(run)
    images, _, held = split_digits(read_json(data / "meta.json", "omni corpus")["seed"])
    codec = loaded.tokenizer.codecs["image"]
    back = np.stack([codec.decode(codec.encode(x)) for x in images[held]])
    report["image_tokenizer_psnr_db"] = psnr(images[held], back)  # over all held-out pixels
    report["image_codes"], report["audio_codes"] = codec.n_codes, loaded.tokenizer.codecs["audio"].n_codes
    report["parameters"] = loaded.model.num_params()
    report["seconds"] = {**times, "total": time.perf_counter() - t0}
    atomic_write_json(out / "omni_report.json", report)
    return report


def _claims(r: dict) -> list[Claim]:
    c, lat = r["ceilings"], r["latency_first_audio_chunk"]
    any_to_any = [t for t, target in TARGETS.items() if target and r[t]["accuracy"] < target]
    tts_ceiling = c["speech_judge_on_real_speech:text_to_speech"]
    claims = [
        Claim("One model, trained end to end, takes any combination of text, audio and image and generates any "
              "combination of them", "GPT-4o: \"a single new model end-to-end across text, vision, and audio\"",
              ", ".join(f"{t.replace('_', ' ')} {100 * r[t]['accuracy']:.0f}%" for t in TARGETS),
              not any_to_any, "" if not any_to_any else f"short of the target on {', '.join(any_to_any)} (targets: "
              + ", ".join(f"{t} ≥ {v:.0%}" for t, v in TARGETS.items() if v) + ")"),
        Claim("It speaks: its speech is understood as well as real speech", "GPT-4o's voice output (no figure)",
              f"PocketSphinx word accuracy {100 * r['text_to_speech']['accuracy']:.1f}% on its speech vs "
              f"{100 * tts_ceiling:.1f}% on eSpeak's own", r["text_to_speech"]["accuracy"] >= 0.8 * tts_ceiling),
        Claim("It sees and draws", "GPT-4o: image understanding and generation from one model",
              f"reads held-out digits {100 * r['image_to_text']['accuracy']:.0f}%; its drawings read by the SVM "
              f"{100 * r['text_to_image']['accuracy']:.0f}% greedy, {100 * r['text_to_image_grid']:.0f}% sampled "
              f"(SVM on real digits {100 * c['digit_judge_on_real_heldout_digits']:.0f}%)",
              r["image_to_text"]["accuracy"] >= 0.9 and r["text_to_image"]["accuracy"] >= 0.8)]
    if lat and lat["n"]:
        claims.append(Claim("It answers spoken input about as fast as a person in conversation", "232 ms at best, "
                            "320 ms on average to respond to audio input", f"first audio chunk p50 "
                            f"{lat['p50_ms']:.0f} ms, p90 {lat['p90_ms']:.0f} ms through `gptlab serve` (n = {lat['n']})",
                            lat["p50_ms"] <= 320, "a 2M model on a CPU: the paper's figure is a 100B-class model on "
                            "a datacentre, so this shows the pipeline's overhead, not parity"))
    return claims


def run(out: Path, scale: str = "cpu", quiet: bool = False) -> Reproduction:
    t0, s = time.perf_counter(), SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    r = measure(out, s, quiet)
    c = r["ceilings"]
    rows = ["| task (held-out images, held-out voice) | one gptlab model | target | judge on real data |",
            "|---|---|---|---|"]
    for t, target in TARGETS.items():
        ceil = c["digit_judge_on_real_heldout_digits"] if t in ("image_to_text", "text_to_image") else \
            c.get(f"speech_judge_on_real_speech:{t}")
        said = r[t].get("transcript_accuracy")
        rows.append(f"| {NAMES[t]} | {100 * r[t]['accuracy']:.1f}%" + ("" if said is None else f" (its transcript "
                    f"{100 * said:.1f}%)") + f" | {'—' if not target else f'≥ {target:.0%}'} | "
                    + ("—" if ceil is None else f"{100 * ceil:.1f}%") + " |")
    setup = (f"The embedded omni corpus ({s['per_task']:,} training and {s['test_per_task']} test examples per task; "
             f"held-out digit images, a held-out voice) and one GPT of {r['parameters'] / 1e6:.2f}M parameters "
             f"({s['model']['n_layer']} layers × {s['model']['n_embd']}, context {s['model']['block_size']}) trained "
             f"from scratch by `gptlab sft` for {s['steps']} steps of {s['batch']} conversations. Tokenizers: a "
             f"{r['image_codes']}-code image palette ({r['image_tokenizer_psnr_db']:.1f} dB PSNR on held-out digits), a "
             f"{r['audio_codes']}-code log-mel speech codebook with Griffin-Lim, characters for text. Time: corpus "
             f"{r['seconds']['data'] / 60:.1f} min, training {r['seconds']['train'] / 60:.1f} min (0 when cached).")
    return Reproduction("gpt4o", PAPER, setup, _claims(r), {"Every direction, judged": "\n".join(rows)},
                        {"Digits the model draws when asked \"Draw a N.\" (one row per digit, sampled at T = 1)":
                         out / "omni_digits.png"}, r, time.perf_counter() - t0)
