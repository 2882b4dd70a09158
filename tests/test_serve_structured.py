"""Structured output and tools: grammar-constrained rows in the engine (checked against Pydantic and
Python's re), the tool-call template against transformers' Jinja rendering, and the server through the
official `openai` client (`parse` with a Pydantic model, forced and streamed tool calls)."""

import json
import random
import re
from typing import Literal

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
pydantic = pytest.importorskip("pydantic")

from gptlab.align.data import load_sft_examples  # noqa: E402
from gptlab.chat.template import JINJA_TEMPLATE, ensure_chat_tokens, render_ids, render_text  # noqa: E402
from gptlab.chat.tools import CallStream, forced_call_grammar, parse_calls  # noqa: E402
from gptlab.generate import Generator  # noqa: E402
from gptlab.generate.constrain import compile_grammar  # noqa: E402
from gptlab.model import GPT, GPTConfig  # noqa: E402
from gptlab.serve.engine import Engine  # noqa: E402
from gptlab.serve.metrics import Metrics  # noqa: E402
from gptlab.serve.protocol import APIError, completion_prompts, parse_request  # noqa: E402
from gptlab.serve.structured import parse_tools, request_grammar  # noqa: E402
from gptlab.tokenizer import gpt2_tokenizer  # noqa: E402

from test_serve_engine import _run_engine  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"], "additionalProperties": False}}}


class Reading(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict mode
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int = pydantic.Field(ge=-40, le=50)
    sunny: bool


@pytest.fixture(scope="module")
def tok():
    return ensure_chat_tokens(gpt2_tokenizer())


@pytest.fixture(scope="module")
def engine(tok):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    e = Engine(Generator(m, tok), Metrics(), max_batch=16, max_queue=32)
    e.start()
    yield e
    e.stop()


def _spec(tok, body, max_tokens=80):
    body = {"model": "m", "prompt": "Answer:", "max_tokens": max_tokens, "temperature": 1.0, **body}
    spec = parse_request(body, "completion", lambda b: (*completion_prompts(b, tok, tok.vocab_size), ()), 256, 32,
                         tok.vocab_size)
    spec.grammar = request_grammar(body, None)
    return spec


def test_constrained_rows_always_parse_and_leave_their_neighbours_alone(tok, engine):
    """A random model samples at T=1 under each constraint: every finished reply is valid, and a free row
    sharing the batch decodes exactly as it does alone (masks are per row)."""
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": Reading.model_json_schema()}}
    specs = [_spec(tok, {"response_format": schema, "seed": s, "n": 2}) for s in range(3)]
    specs += [_spec(tok, {"guided_regex": r"[0-9]{3}-[a-z]{2,4}", "seed": 7, "n": 3}),
              _spec(tok, {"guided_choice": ["yes", "no", "maybe not"], "seed": 8, "n": 4}),
              _spec(tok, {"response_format": {"type": "json_object"}, "seed": 9, "n": 2}, max_tokens=200),
              _spec(tok, {"seed": 3, "temperature": 0.0}, max_tokens=20)]
    outs = _run_engine(engine, specs)
    for texts, _, reasons, _ in outs[:3]:
        for i, t in texts.items():
            assert reasons[i] == "stop", t  # the grammar ended the reply, not max_tokens
            Reading.model_validate_json(t)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) for t in outs[3][0].values()), outs[3][0]
    assert all(t in ("yes", "no", "maybe not") for t in outs[4][0].values())
    for i, t in outs[5][0].items():
        if outs[5][2][i] == "stop":
            assert isinstance(json.loads(t), dict)
    alone = _run_engine(engine, [_spec(tok, {"seed": 3, "temperature": 0.0}, max_tokens=20)])[0]
    assert alone[1] == outs[6][1]
    # the same seeded constrained request alone gives the same tokens as in the mixed batch
    assert _run_engine(engine, [specs[0]])[0][1] == outs[0][1]


def test_request_constraints_and_tools_are_validated(tok):
    def bad(body, param):
        with pytest.raises(APIError) as e:
            request_grammar(body, parse_tools(body))
        assert e.value.status == 400 and e.value.param == param, e.value.message
        return e.value.message

    assert "regex" in bad({"guided_regex": "("}, "guided_regex")
    bad({"guided_choice": []}, "guided_choice")
    bad({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}}, "response_format")
    bad({"response_format": {"type": "xml"}}, "response_format")
    assert "only one" in bad({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice")
    bad({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice")
    bad({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools")
    bad({"tool_choice": "required"}, "tool_choice")
    bad({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "x"}, "tool_choice")
    # GBNF (llama.cpp's grammar language) is converted
    assert request_grammar({"guided_grammar": 'root ::= "a" | "b"'}, None)


def test_forced_tool_calls_are_valid_calls(tok, engine):
    for choice, parallel in (("required", True), ("get_time", False)):
        body = {"tools": [WEATHER, TIME], "tool_choice": choice if choice == "required" else
                {"type": "function", "function": {"name": choice}}, "parallel_tool_calls": parallel}
        tools = parse_tools(body)
        spec = _spec(tok, {**body, "seed": 1, "n": 4}, max_tokens=120)
        spec.grammar = request_grammar(body, tools)
        texts, _, reasons, _ = _run_engine(engine, [spec])[0]
        for i, t in texts.items():
            content, calls = parse_calls(t)
            assert reasons[i] == "stop" and content == "" and calls, t
            assert parallel or len(calls) == 1
            for c in calls:
                name, args = c["function"]["name"], json.loads(c["function"]["arguments"])
                assert name in (("get_weather", "get_time") if choice == "required" else (choice,))
                if name == "get_time":
                    assert set(args) == {"zone"} and -12 <= args["zone"] <= 14
                else:
                    assert args["city"] in ("Paris", "Rome", "Oslo") and args["unit"] in ("C", "F")


def test_call_stream_matches_parse_calls_at_any_chunking():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>')
    content, calls = parse_calls(text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"}
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 30)))
        s, out, got = CallStream(), "", []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            o, c = s.feed(text[a:b], final=b == len(text))
            out, got = out + o, got + c
        assert out == content and [(c["index"], c["function"]) for c in got] == \
            [(i, c["function"]) for i, c in enumerate(calls)]
    assert parse_calls("no <tool_call>{broken</tool_call> call") == ("no <tool_call>{broken</tool_call> call", [])
    s = CallStream()
    assert s.feed("x <tool_call>\n{\"name\"") == ("x ", []) and s.feed("", final=True) == ("<tool_call>\n{\"name\"", [])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo? <tags> & 'quotes'"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "C"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": 1}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": -3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "10:04"},
    {"role": "assistant", "content": "-3 °C at 10:04."},
]


def test_tool_conversations_render_like_transformers_jinja(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()),
                                                chat_template=JINJA_TEMPLATE)
    for msgs, tools in ((CONVERSATION, [WEATHER, TIME]), (CONVERSATION[1:], [WEATHER]), (CONVERSATION, None)):
        for gen in (True, False):
            ref = fast.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
            assert ref == render_text(msgs, gen, tools)
            ids, mask = render_ids(tok, msgs, gen, tools=tools)
            assert tok.encode(ref, allowed_special="all") == ids
    # SFT rows: the assistant's calls are trained on, the tool results are not
    row = {"messages": CONVERSATION, "tools": [WEATHER, TIME]}
    conv = load_sft_examples([row])[0]
    ids, mask = render_ids(tok, conv, add_generation_prompt=False)
    trained = tok.decode([t for t, k in zip(ids, mask) if k])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}' in trained
    assert "<tool_response>" not in trained and "get_time" in trained and "Be brief" not in trained
    assert ids == render_ids(tok, CONVERSATION, False, tools=[WEATHER, TIME])[0]


def test_forced_call_grammar_accepts_the_template_rendering(tok):
    """What the template renders for a call is what the forced grammar admits (so a model trained on
    rendered calls writes calls the grammar allows)."""
    import llguidance

    from gptlab.chat.tools import call_text
    from gptlab.generate.constrain import ll_tokenizer

    g = compile_grammar("lark", forced_call_grammar([WEATHER, TIME], None, True))
    calls = CONVERSATION[2]["tool_calls"]
    m = llguidance.LLMatcher(ll_tokenizer(tok), g)
    text = "\n".join(call_text(c) for c in calls)
    assert m.consume_tokens(tok.encode(text)) and m.is_accepting(), m.get_error()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    pytest.importorskip("openai")
    from gptlab.run import write_run_config
    from gptlab.run.format import MODEL_FILE, save_model
    from test_serve import Server

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=32)
    d = tmp_path_factory.mktemp("structured")
    write_run_config(d / "run", cfg, tok)
    save_model(GPT(cfg).eval(), d / "run" / MODEL_FILE)
    s = Server(d / "run", d / "server.log").wait_healthy()
    s.run_dir = d / "run"
    yield s
    s.stop()


def test_openai_client_parse_tools_and_streamed_tool_calls(server):
    import openai

    c = server.client()
    user = [{"role": "user", "content": "How is the weather in Oslo?"}]
    # the SDK's parse(): a strict json_schema from the Pydantic model, the reply parsed back into it
    for seed in range(3):
        r = c.beta.chat.completions.parse(model="tiny", messages=user, response_format=Reading, seed=seed,
                                          max_tokens=60)
        assert isinstance(r.choices[0].message.parsed, Reading), r.choices[0].message.content
    # a forced call: message.tool_calls with arguments valid for the schema, finish_reason tool_calls
    r = c.chat.completions.create(model="tiny", messages=user, tools=[WEATHER, TIME], tool_choice="required",
                                  parallel_tool_calls=False, seed=1, max_tokens=60)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    # the same request streamed: delta.tool_calls carries the same call
    chunks = list(c.chat.completions.create(model="tiny", messages=user, tools=[WEATHER, TIME], seed=1,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                            stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(0, call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # pydantic_function_tool (strict) with a named tool_choice
    tool = openai.pydantic_function_tool(Reading, name="report")
    r = c.beta.chat.completions.parse(model="tiny", messages=user, tools=[tool], seed=2, max_tokens=60,
                                      tool_choice={"type": "function", "function": {"name": "report"}})
    parsed = r.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Reading)
    # the call and its result go back into the history; the next turn renders them
    history = user + [r.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": r.choices[0].message.tool_calls[0].id, "content": "sunny"}]
    again = c.chat.completions.create(model="tiny", messages=history, tools=[tool], max_tokens=5)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        c.chat.completions.create(model="tiny", max_tokens=5, messages=user + [
            {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="regex"):
        c.chat.completions.create(model="tiny", messages=user, extra_body={"guided_regex": "("})
    # vLLM's guided_choice on completions
    r = c.completions.create(model="tiny", prompt="Yes or no?", max_tokens=10, n=4, seed=0,
                             extra_body={"guided_choice": ["yes", "no"]})
    assert {ch.text for ch in r.choices} <= {"yes", "no"} and all(ch.finish_reason == "stop" for ch in r.choices)


def test_embeddings_are_normalised_mean_hidden_states(server, tok):
    import openai

    from gptlab.run import load_run

    c = server.client()
    texts = ["The cat sat on the mat.", "Le chat", "a"]
    r = c.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64 and decodes it
    model = load_run(server.run_dir, "cpu").model
    with torch.no_grad():
        ref = [torch.nn.functional.normalize(model.hidden(torch.tensor([tok.encode(t)]))[0].mean(0), dim=0)
               for t in texts]
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)
    for d, e in zip(r.data, ref):
        assert torch.allclose(torch.tensor(d.embedding), e, atol=1e-5)
    floats = server.post("/v1/embeddings", json.dumps({"model": "tiny", "input": [tok.encode("Le chat")],
                                                       "encoding_format": "float"})).json()
    assert floats["data"][0]["embedding"] == pytest.approx(r.data[1].embedding, abs=1e-6)
    for bad in ({"input": ""}, {"input": [], }, {"input": "x", "dimensions": 7}, {"input": "x", "encoding_format": "hex"}):
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model="tiny", **bad)
