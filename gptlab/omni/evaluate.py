"""The omni figures on the held-out split: every task of test.jsonl (held-out images, the held-out voice)
answered by the one model with greedy decoding, each reply judged (text compared; images read by the digit
classifier; speech transcribed by PocketSphinx), next to the judges' ceilings on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gptlab.chat.template import END, render_ids
from gptlab.errors import GptlabError
from gptlab.generate import Generator, SamplingParams
from gptlab.generate.spans import split_reply
from gptlab.omni.corpus import ASSISTANT_VOICE, split_digits
from gptlab.omni.espeak import speak
from gptlab.omni.judges import WORDS, DigitJudge, SpeechJudge, word_accuracy
from gptlab.omni.media import load_content
from gptlab.run import load_run


def _prompt(row: dict, base: Path) -> list[dict]:
    return [{**m, "content": load_content(m["content"], "test row", base)} for m in row["messages"][:-1]]


def _score(task: str, answer: str, parts: list[dict], digit: DigitJudge, speech: SpeechJudge) -> dict:
    text = " ".join(p["text"] for p in parts if p["type"] == "text").strip()
    images = [p["image"] for p in parts if p["type"] == "image"]
    audio = [p["audio"] for p in parts if p["type"] == "audio"]
    heard = speech(audio[0]) if audio else ""
    drawn = WORDS[digit(images[0])] if images else ""
    if task in ("image_to_text", "speech_to_text"):
        return {"score": word_accuracy(text, answer), "reply": text}
    if task == "text_to_image":
        return {"score": float(drawn == answer), "reply": drawn}
    if task in ("text_to_speech", "image_speech_to_speech"):  # the transcript: what the model says it said
        return {"score": word_accuracy(heard, answer), "reply": heard, "transcript": word_accuracy(text, answer)}
    ok = [drawn == answer, heard == answer, text == answer]  # mixed: all three parts right
    return {"score": float(all(ok)), "reply": f"image {drawn!r} · speech {heard!r} · text {text!r}",
            "parts": {"image": ok[0], "speech": ok[1], "text": ok[2]}}


def evaluate_omni(run_dir: str | Path, data_dir: str | Path, *, limit: int | None = None, batch: int = 16,
                  dtype: str = "auto", out_dir: str | Path | None = None) -> dict:
    """-> {task: {"accuracy", "n"}, "ceilings": {...}}; with `out_dir`, the replies as JSONL and media."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    rows = [json.loads(ln) for ln in (data_dir / "test.jsonl").read_text().splitlines()]
    run = load_run(run_dir)
    tok = run.tokenizer
    if not hasattr(tok, "codecs"):
        raise GptlabError(f"{run_dir} is a text-only run; the omni evaluation needs an omni model")
    images, labels, held = split_digits(meta["seed"])
    digit, speech = DigitJudge(images[~held], labels[~held]), SpeechJudge()
    gen = Generator(run.model, tok, dtype=dtype, rows=batch)
    params = SamplingParams(max_new_tokens=200, temperature=0, stop_token_ids=(tok.special_tokens[END],))
    results: dict[str, list[dict]] = {}
    for task in meta["tasks"]:
        todo = [r for r in rows if r["task"] == task][:limit]
        for k in range(0, len(todo), batch):
            chunk = todo[k:k + batch]
            prompts = [render_ids(tok, _prompt(r, data_dir))[0] for r in chunk]
            for r, c in zip(chunk, gen.generate(prompts, params)):
                results.setdefault(task, []).append({**_score(task, r["answer"], split_reply(tok, c.token_ids), digit, speech),
                                                     "answer": r["answer"]})
    report = {t: {"accuracy": float(np.mean([x["score"] for x in v])), "n": len(v)} for t, v in results.items()}
    for t, v in results.items():
        if "transcript" in v[0]:
            report[t]["transcript_accuracy"] = float(np.mean([x["transcript"] for x in v]))
    codec = tok.codecs["audio"]
    report["ceilings"] = {"digit_judge_on_real_heldout_digits":
                          float(np.mean([digit(images[i]) == labels[i] for i in np.flatnonzero(held)]))}
    for task in ("text_to_speech", "image_speech_to_speech"):  # the judge on the real voice saying the same answers
        real = [(r["answer"], speak(r["answer"], *ASSISTANT_VOICE)) for r in rows if r["task"] == task][:limit]
        report["ceilings"][f"speech_judge_on_real_speech:{task}"] = float(np.mean([word_accuracy(speech(w), a)
                                                                                  for a, w in real]))
        report["ceilings"][f"speech_judge_on_tokenizer_round_trip:{task}"] = float(np.mean(
            [word_accuracy(speech(codec.decode(codec.encode(w))), a) for a, w in real]))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "omni_eval.json").write_text(json.dumps({"report": report, "replies": results}, indent=1))
    return report
