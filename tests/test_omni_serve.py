"""A tiny omni model end to end, in well under a minute: the corpus, SFT of the one GPT class on every
modality, generation through the span grammar, and `gptlab serve` answering OpenAI-shaped image and audio
requests (the official `openai` client and raw HTTP)."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sf = pytest.importorskip("soundfile")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gptlab.align.sft import sft  # noqa: E402
from gptlab.chat.template import END, render_ids  # noqa: E402
from gptlab.generate import Generator, SamplingParams  # noqa: E402
from gptlab.generate.spans import split_reply  # noqa: E402
from gptlab.omni.corpus import build_corpus  # noqa: E402
from gptlab.omni.media import png_bytes, wav_bytes  # noqa: E402
from gptlab.run import load_run  # noqa: E402
from gptlab.serve.media import output_modalities  # noqa: E402
from gptlab.serve.protocol import APIError  # noqa: E402
from gptlab.tokenizer import CharTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def omni_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("omni")
    build_corpus(d / "data", per_task=8, test_per_task=2, image_codes=32, audio_codes=32, quiet=True)
    sft(d / "run", str(d / "data" / "train.jsonl"), preset_name="tiny", tokenizer=d / "data" / "tokenizer.gptlab.json",
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 256},
        train={"max_iters": 20, "batch_size": 8, "dtype": "float32", "eval_iters": 1, "lr": 3e-3, "log_interval": 5},
        quiet=True)
    return d


def test_the_one_model_trains_on_every_modality_and_generates_media(omni_run):
    run = load_run(omni_run / "run")
    tok = run.tokenizer
    assert run.model.cfg.vocab_size == tok.vocab_size  # one GPT, one vocabulary: text ids + codes + markers
    recs = [json.loads(ln) for ln in (omni_run / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]
    gen = Generator(run.model, tok)
    prompt = render_ids(tok, [{"role": "user", "content": "Draw a seven."}])[0]
    bias_image = SamplingParams(max_new_tokens=40, temperature=0.8, seed=0, stop_token_ids=(tok.special_tokens[END],),
                                modalities=("text", "image"))
    for c in gen.generate([prompt] * 4, bias_image):
        for part in split_reply(tok, c.token_ids):
            assert part["type"] in ("text", "image")  # audio was not asked for
            if part["type"] == "image":
                assert part["image"].shape == (8, 8)


class _Server:
    def __init__(self, run_dir, log):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run_dir), "--port", str(self.port),
                                      "--model-name", "omni", "--log-level", "warning", "--dtype", "float32"],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, log.read_text()[-2000:]
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(log.read_text()[-2000:])


@pytest.fixture(scope="module")
def omni_server(omni_run):
    s = _Server(omni_run / "run", omni_run / "serve.log")
    yield s
    s.proc.terminate()
    s.proc.wait(10)


def _media(omni_run):
    img = png_bytes(np.eye(8, dtype=np.float32))
    rows = [json.loads(ln) for ln in (omni_run / "data" / "test.jsonl").read_text().splitlines()]
    audio_path = next(p["path"] for r in rows for m in r["messages"] for p in m["content"] if p["type"] == "audio")
    wave, sr = sf.read(omni_run / "data" / audio_path, dtype="float32")
    return base64.b64encode(img).decode(), base64.b64encode(wav_bytes(wave, sr)).decode()


def test_serve_takes_images_and_speech_and_answers_with_speech(omni_run, omni_server):
    img, wav = _media(omni_run)
    tok = load_run(omni_run / "run").tokenizer
    opener = tok.markers["<|audio|>"]
    client = openai.OpenAI(base_url=omni_server.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model="omni", modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, max_tokens=40,
        logit_bias={str(opener): 100}, seed=1,  # a tiny model: make it speak
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}},
                                                {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}])
    msg = r.choices[0].message
    assert msg.content is None and msg.audio.id.startswith("audio_") and isinstance(msg.audio.transcript, str)
    wave, sr = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)))
    assert sr == 16000 and len(wave) > 0.1 * sr  # a real WAV with speech-length audio
    # streamed: delta.audio chunks (pcm16 at 24 kHz, as OpenAI streams), the first before the reply ends
    chunks, t0, first = [], time.perf_counter(), None
    for ev in client.chat.completions.create(
            model="omni", modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"}, max_tokens=60,
            logit_bias={str(opener): 100}, seed=1, stream=True,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Say four two nine."}]}]):
        delta = ev.choices[0].delta if ev.choices else None
        audio = (getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")) if delta else None
        data = (audio.get("data") if isinstance(audio, dict) else getattr(audio, "data", None)) if audio else None
        if data:
            first = first or time.perf_counter() - t0
            chunks.append(base64.b64decode(data))
    assert len(chunks) >= 2 and all(len(c) % 2 == 0 for c in chunks) and first is not None


def test_serve_refuses_what_it_cannot_do_with_400s(omni_server):
    h = {"Content-Type": "application/json"}
    for body, msg in [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
         "only data: URLs"),
        ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]}, "'audio' is required"),
        ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
          "audio": {"format": "mp3"}}, "audio.format must be one of wav, pcm16"),
        ({"messages": [{"role": "user", "content": "hi"}], "modalities": ["video"]}, "unknown modalities"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}}]}]},
         "not valid base64"),
    ]:
        r = httpx.post(omni_server.url + "/v1/chat/completions", content=json.dumps({"model": "omni", **body}), headers=h)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], (body, r.text)


def test_a_text_only_model_refuses_media_in_and_out():
    text_only = CharTokenizer.from_text("abc")
    with pytest.raises(APIError, match="cannot answer with audio"):
        output_modalities({"modalities": ["text", "audio"], "audio": {"format": "wav"}}, text_only)
    from gptlab.serve.protocol import chat_messages

    with pytest.raises(APIError, match="reads text only; it cannot take image input"):
        chat_messages({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
                      text_only)


def test_web_page_attaches_media_and_plays_spoken_replies_in_headless_chromium(omni_run, omni_server, tmp_path,
                                                                               chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    img, wav = _media(omni_run)
    (tmp_path / "q.png").write_bytes(base64.b64decode(img))
    (tmp_path / "q.wav").write_bytes(base64.b64decode(wav))
    opener = load_run(omni_run / "run").tokenizer.markers["<|audio|>"]
    driver = chromium("--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
                      "--use-fake-device-for-media-stream")
    try:
        driver.get(omni_server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "media").is_displayed())  # the model card says omni
        # a tiny model rarely speaks on its own: the page's request gets a logit bias towards <|audio|>
        driver.execute_script("""const f = window.fetch; window.sentBodies = [];
            window.fetch = (url, o) => { if (o && o.body) { const b = JSON.parse(o.body); b.logit_bias = {[arguments[0]]: 100};
              window.sentBodies.push(b); o = {...o, body: JSON.stringify(b)}; } return f(url, o); };""".replace(
            "arguments[0]", str(opener)))
        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "q.png"))
        driver.find_element(By.ID, "audio").send_keys(str(tmp_path / "q.wav"))
        wait.until(lambda d: "audio attached" in d.find_element(By.ID, "attached").text)
        driver.find_element(By.ID, "speak").click()
        el = driver.find_element(By.ID, "max_tokens")
        el.clear()
        el.send_keys("40")
        driver.find_element(By.ID, "input").send_keys("what digit is this\n")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user")
        assert user.find_elements(By.TAG_NAME, "img") and user.find_elements(By.TAG_NAME, "audio")
        body = driver.execute_script("return window.sentBodies[0]")
        kinds = [p["type"] for p in body["messages"][-1]["content"]]
        assert kinds == ["text", "image_url", "input_audio"] and body["modalities"] == ["text", "audio"]
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert int(reply.get_attribute("data-audio-chunks") or 0) >= 1  # streamed speech reached the player
        assert driver.save_screenshot(str(tmp_path / "omni.png"))
    finally:
        driver.quit()


def test_generate_and_chat_take_media_and_save_media_replies(omni_run, tmp_path, capsys):
    from gptlab.chat.repl import run_chat
    from gptlab.cli import main as cli_main

    img, wav = _media(omni_run)
    (tmp_path / "q.png").write_bytes(base64.b64decode(img))
    (tmp_path / "q.wav").write_bytes(base64.b64decode(wav))
    assert cli_main(["generate", str(omni_run / "run"), "--prompt", "Draw a seven.", "--image", str(tmp_path / "q.png"),
                     "--audio", str(tmp_path / "q.wav"), "--out-dir", str(tmp_path / "gen"), "--max-new-tokens", "40",
                     "--temperature", "0", "--dtype", "float32"]) == 0
    capsys.readouterr()
    run = load_run(omni_run / "run")
    gen = Generator(run.model, run.tokenizer)
    said = []
    lines = iter(["/image " + str(tmp_path / "q.png"), "/audio " + str(tmp_path / "nothing.wav"), "what digit is this",
                  "/quit"])
    history = run_chat(gen, run.tokenizer, 256, SamplingParams(max_new_tokens=30, temperature=0, modalities=("text", "image")),
                       input_fn=lambda _: next(lines), print_fn=lambda *x, **k: said.append(" ".join(map(str, x))),
                       media_dir=str(tmp_path / "chat"))
    assert "(image attached to your next message)" in said and any("audio file not found" in s for s in said)
    assert [p["type"] for p in history[0]["content"]] == ["text", "image"]
    for p in history[1]["content"]:
        assert p["type"] in ("text", "image")
    saved = [s for s in said if "saved to" in s]
    assert all(Path(s.split("saved to ")[1].split("]")[0]).is_file() for s in saved)
