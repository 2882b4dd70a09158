"""Request bodies as Pydantic models, for /openapi.json and /docs.

They document; they do not validate. gptlab.serve.protocol checks every field by hand because OpenAI's
clients expect its error shape (400 with the offending field in `param`, e.g. `max_tokens` for a context
overflow), which FastAPI's 422 validation errors do not give.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, description="vLLM's: 0 or -1 is off")
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(None, description="include_usage, continuous_usage_stats (vLLM)")
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = Field(None, description="{'type': 'text' | 'json_object' | 'json_schema', "
                                                                     "'json_schema': {'name', 'schema'}}")
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = Field(None, description="Lark, or GBNF")
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's: json, regex, choice, grammar, json_object")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(description="role system/developer, user, assistant (with tool_calls) "
                                                       "or tool (with tool_call_id); content a string or parts")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def body_doc(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose body is read by hand."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
