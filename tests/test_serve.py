"""The server end to end: real uvicorn processes on 127.0.0.1, the official `openai` client, raw HTTP for
bad input, and the web page in headless Chromium."""

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from gptlab.chat.template import ensure_chat_tokens, render_ids  # noqa: E402
from gptlab.generate import Generator, SamplingParams  # noqa: E402
from gptlab.model import GPT, GPTConfig  # noqa: E402
from gptlab.run import write_run_config  # noqa: E402
from gptlab.serve.metrics import parse_metrics  # noqa: E402
from gptlab.tokenizer import gpt2_tokenizer  # noqa: E402
from gptlab.run.format import MODEL_FILE, save_model  # noqa: E402

KEY = "sk-test-key"
CTX = 1024


class Server:
    def __init__(self, run_dir: Path, log: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTLAB_API_KEYS": f"other-key,{KEY}"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(run_dir), "--port", str(self.port),
                                      "--model-name", "tiny", "--log-level", "warning", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self):
        log = self.log
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"server did not become healthy: {log.read_text()[-2000:]}")

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def post(self, path, content, headers=None, timeout=30):
        h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(self.url + path, content=content, headers=h, timeout=timeout)

    def wait_idle(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.metrics()
            if m["gptlab_requests_running"] == 0 and m["gptlab_requests_waiting"] == 0:
                return m
            time.sleep(0.05)
        raise AssertionError("server did not go idle")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A tiny random model (GPT-2 BPE + chat tokens) and two servers started together: `main` (API keys,
    default limits) and `busy` (one row, one waiting slot, a blocklist holding a word the model says)."""
    tok = ensure_chat_tokens(gpt2_tokenizer())
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=CTX, n_layer=2, n_head=2, n_embd=32)
    d = tmp_path_factory.mktemp("serve")
    model = GPT(cfg).eval()
    write_run_config(d / "tiny-run", cfg, tok)
    save_model(model, d / "tiny-run" / MODEL_FILE)
    # the server's greedy text equals the generator's (tests/test_serve_engine.py checks that)
    probe = Generator(model, tok).generate(["Hello world"], SamplingParams(max_new_tokens=12, temperature=0))[0].text
    words = re.findall(r"[A-Za-z]{3,}", probe)
    assert words, probe
    (d / "blocklist.txt").write_text(f"# terms\nforbiddenword\n{words[0]}\n")
    main = Server(d / "tiny-run", d / "main.log")
    busy = Server(d / "tiny-run", d / "busy.log", "--max-batch", "1", "--max-queue", "1",
                  "--moderation", str(d / "blocklist.txt"))
    busy.probe, busy.term = probe, words[0]
    try:
        yield main.wait_healthy(), busy.wait_healthy()
    finally:
        main.stop()
        busy.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def busy_server(servers):
    return servers[1]


def test_completions_chat_streaming_usage(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    n_prompt = len(gpt2_tokenizer().encode("Hello world"))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 12
    chunks = list(c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices]) > 2  # really streamed, token by token
    # echo + logprobs (lm-eval's scoring call): the prompt's tokens come first, the first without a logprob
    e = c.completions.create(model="tiny", prompt="Hello world", max_tokens=2, temperature=0, echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert e.choices[0].text.startswith("Hello world") and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[:n_prompt]) == "Hello world" and all(v < 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[:n_prompt] == [0, len("Hello")]
    first = next(iter(c.completions.create(model="tiny", prompt="Hello world", max_tokens=2, temperature=0, echo=True,
                                           logprobs=1, stream=True)))
    assert first.choices[0].text == "Hello world"
    assert first.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]  # streamed: after the prefill
    # vLLM's continuous_usage_stats: every chunk carries the usage so far
    chunks = list(c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True}))
    done = [ch.usage.completion_tokens for ch in chunks]
    assert done == sorted(done) and done[-1] == r.usage.completion_tokens and done[1] >= 1
    assert all(ch.usage.prompt_tokens == n_prompt for ch in chunks)

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|end|> there"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=16, temperature=0.8, seed=42)
    full = c.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens <= 16
    stream = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
    assert stream[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the user's "<|end|>" stays text: the prompt has exactly the template's two end markers
    tk = server.post("/tokenize", json.dumps({"messages": msgs})).json()
    end_id = ensure_chat_tokens(gpt2_tokenizer()).special_tokens["<|end|>"]
    assert tk["tokens"].count(end_id) == 2 and tk["count"] == full.usage.prompt_tokens
    eot = gpt2_tokenizer().eot_id  # a special token asked by name (lm-eval's remote tokenizer); in text it stays text
    assert server.post("/tokenize", json.dumps({"prompt": "<|endoftext|>"})).json()["tokens"] == [eot]
    assert eot not in server.post("/tokenize", json.dumps({"prompt": "a<|endoftext|>"})).json()["tokens"]
    info = httpx.get(server.url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CTX
    detok = server.post("/detokenize", json.dumps({"tokens": tk["tokens"][:4]})).json()
    assert detok["prompt"] == "<|system|>Be brief."
    # vLLM's continue_final_message: the reply goes on from an open assistant message
    open_turn = msgs + [{"role": "assistant", "content": "Sure,"}]
    r = c.chat.completions.create(model="tiny", messages=open_turn, max_tokens=4, temperature=0,
                                  extra_body={"add_generation_prompt": False, "continue_final_message": True})
    ids = render_ids(ensure_chat_tokens(gpt2_tokenizer()), open_turn, False, True)[0]
    assert r.usage.prompt_tokens == len(ids)
    plain = c.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert plain.choices[0].text.startswith(r.choices[0].message.content)  # (the chat reply may stop sooner)
    # n choices and a list of prompts; logprobs
    r = c.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=4, temperature=0, logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.choices[0].text == r.choices[1].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    # greedy, so the reply is the same on every machine (a sampled one once came back with no logprobs in CI)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2, temperature=0)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= r.usage.completion_tokens
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob == pytest.approx(x.logprob) for x in content)


def test_errors_and_auth(server):
    def err(resp, status, code=None):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        if code:
            assert e["code"] == code
        return e

    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
    err(httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}), 401, "invalid_api_key")
    assert httpx.get(server.url + "/health").status_code == 200  # public
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    ok = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2})
    err(server.post("/v1/completions", '{"model": "tiny", "prompt": '), 400, "invalid_json")
    err(server.post("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400, "invalid_utf8")
    err(server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10 ** 6})), 400)
    err(server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": 5})), 400)
    err(server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"})), 400)
    err(server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": [7] * CTX})), 400,
        "context_length_exceeded")
    err(server.post("/v1/chat/completions", json.dumps({"model": "tiny", "max_tokens": 1000,
                                                        "messages": [{"role": "user", "content": "hi " * 100}]})),
        400, "context_length_exceeded")
    err(server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x" * (3 << 20)})), 413)
    err(server.post("/v1/nothing", ok), 404)
    err(server.post('/v1/x%22%7D%201%0Agptlab_fake%7Ba%3D%22', ok), 404)  # a decoded path must not become a label
    m = server.metrics()
    assert not [k for k in m if "nothing" in k or "gptlab_fake" in k]
    assert m['gptlab_http_requests_total{endpoint="other",status="404"}'] >= 2
    # a web page can POST text/plain or a form anywhere without a CORS preflight: only JSON is taken
    before = server.metrics()["gptlab_prompt_tokens_total"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        err(server.post("/v1/completions", ok, headers={"Content-Type": ctype}), 415, "unsupported_media_type")
    assert server.metrics()["gptlab_prompt_tokens_total"] == before  # nothing was generated
    assert server.post("/v1/completions", ok, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    from gptlab import __version__
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]  # request bodies documented for /docs
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "tools", "response_format", "guided_json"} <= set(body["properties"])
    assert "input" in paths["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    # unknown fields are ignored (and logged); the server still answers normal requests
    r = server.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2, "frobnicate": 1}))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    assert "frobnicate" in server.log.read_text()


def test_32_concurrent_streams_equal_each_request_alone(server):
    prompts = [f"Request number {i}: {'once upon a time ' * (i % 5)}" for i in range(32)]

    def kwargs(i):  # greedy and seeded sampling, different lengths
        return dict(model="tiny", prompt=prompts[i], max_tokens=8 + i % 9, temperature=0 if i % 2 else 0.9,
                    seed=i, stream=True, stream_options={"include_usage": True})

    async def one(client, i):
        text, usage = "", None
        async for ch in await client.completions.create(**kwargs(i)):
            text += "".join(c.text for c in ch.choices)
            usage = ch.usage or usage
        return text, usage.completion_tokens

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    before = server.metrics()
    batched = asyncio.run(together())
    assert server.metrics()["gptlab_batch_rows_peak"] >= 8  # they really were decoded together

    async def alone():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            return [await one(client, i) for i in range(32)]

    assert asyncio.run(alone()) == batched
    after = server.wait_idle()
    assert after["gptlab_generation_tokens_total"] - before["gptlab_generation_tokens_total"] == \
        2 * sum(n for _, n in batched)
    assert after["gptlab_time_to_first_token_seconds_count"] >= before["gptlab_time_to_first_token_seconds_count"] + 64


def test_client_disconnect_stops_generation(server):
    before = server.wait_idle()
    body = json.dumps({"model": "tiny", "prompt": "stream me", "max_tokens": 1000, "ignore_eos": True, "stream": True})
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions", content=body,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token seen: hang up
    after = server.wait_idle()
    assert after["gptlab_requests_cancelled_total"] == before["gptlab_requests_cancelled_total"] + 1
    assert after["gptlab_generation_tokens_total"] - before["gptlab_generation_tokens_total"] < 1000
    # a non-streamed request whose client gives up is cancelled too
    body = json.dumps({"model": "tiny", "prompt": "wait for me", "max_tokens": 1000, "ignore_eos": True, "n": 8})
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=0.3)
    final = server.wait_idle()
    assert final["gptlab_requests_cancelled_total"] == after["gptlab_requests_cancelled_total"] + 1
    assert final["gptlab_generation_tokens_total"] - after["gptlab_generation_tokens_total"] < 8000


def test_queue_full_answers_503_with_retry_after(busy_server):
    """One row and one waiting slot: of 10 long requests sent at once, the ones that find both taken
    are answered 503 + Retry-After at once, the others complete. One or two complete: the second only if
    the first has left the queue for the row before the burst fills it (timing on a busy machine)."""
    s = busy_server
    body = json.dumps({"model": "tiny", "prompt": "long", "max_tokens": 300, "ignore_eos": True})

    async def burst():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}",
                                                          "Content-Type": "application/json"}) as h:
            return await asyncio.gather(*(h.post(s.url + "/v1/completions", content=body) for _ in range(10)))

    rs = asyncio.run(burst())
    busy = [r for r in rs if r.status_code == 503]
    done = [r for r in rs if r.status_code == 200]
    assert len(busy) + len(done) == 10 and len(busy) >= 5 and 1 <= len(done) <= 2
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "server_overloaded" for r in busy)
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in done)
    m = s.wait_idle()
    assert m["gptlab_requests_rejected_total"] == len(busy)
    r = s.client().completions.create(model="tiny", prompt="x", max_tokens=2)  # serving again
    assert r.usage.completion_tokens <= 2


def test_moderation_refuses_input_and_redacts_output(busy_server):
    s = busy_server
    with pytest.raises(openai.BadRequestError) as e:
        s.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a ForbiddenWord!"}])
    assert e.value.body["code"] == "content_filter"
    r = s.client().completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0)
    expected = re.sub(rf"(?<![A-Za-z0-9_]){s.term}(?![A-Za-z0-9_])", "[redacted]", s.probe, flags=re.I)
    assert expected != s.probe and r.choices[0].text == expected
    streamed = "".join(ch.choices[0].text for ch in s.client().completions.create(
        model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stream=True))
    assert streamed == expected
    m = s.metrics()
    assert m['gptlab_moderation_actions_total{stage="input",action="refuse",source="blocklist"}'] == 1
    assert m['gptlab_moderation_actions_total{stage="output",action="redact",source="blocklist"}'] == \
        2 * expected.count("[redacted]")
    assert "moderation: refused" in s.log.read_text()


def test_chat_reply_ends_at_any_role_token(server):
    """A model that starts a new turn (<|user|>, <|assistant|>, ...) has finished its own reply, as in `gptlab chat`;
    logit_bias makes this tiny model emit <|user|> at once."""
    user_id = ensure_chat_tokens(gpt2_tokenizer()).special_tokens["<|user|>"]
    r = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0, logit_bias={str(user_id): 100})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == ""
    assert r.usage.completion_tokens == 1


def test_logprobs_cannot_show_what_the_blocklist_redacts(busy_server):
    s = busy_server
    r = s.post("/v1/completions", json.dumps({"model": "tiny", "prompt": "Hello world", "max_tokens": 12,
                                              "temperature": 0, "logprobs": 0}))
    assert r.status_code == 400, r.text  # its tokens would spell out the redacted term
    assert r.json()["error"]["param"] == "logprobs" and s.term not in r.text


def test_web_chat_page_in_headless_chromium(server, tmp_path, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    html = httpx.get(server.url + "/").text
    assert "<script" in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external assets
    driver = chromium()
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "apikey").send_keys(KEY)
        for field, value in (("temperature", "0"), ("max_tokens", "24")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        driver.find_element(By.ID, "input").send_keys("Hello, who are you?\n")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant")
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello, who are you?"
        assert int(reply.get_attribute("data-chunks")) > 1  # arrived in pieces, as streamed
        assert "finish:" in reply.text and not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
        shot = tmp_path / "chat.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        driver.quit()
