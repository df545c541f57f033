"""The request shapes of the OpenAI API that hasten honours, and a 400 naming every field it does not.

Clients send many optional fields. A field hasten would ignore is refused (400, naming it) unless it is null or
has the value that means "off" (`presence_penalty: 0`, `tools: []`, `tool_choice: "none"`, …), so
a client never gets a 200 that silently dropped what it asked for.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS_LIMIT = 8192
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked by unsupported_fields(), not dropped
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # vLLM / llama-server extension; 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # identifies the end user to the provider; changes no output
    method: str | None = None  # hasten: decoding method for this request (default: the server's --method)
    # structured output: {"type": "json_object" | "json_schema" | "text"} as OpenAI's (regex/lark: hasten's own)
    response_format: dict | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[Any] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


# A field outside the models above is accepted only when it asks for nothing: null or its "off" value.
_OFF = {"presence_penalty": [0], "frequency_penalty": [0], "repetition_penalty": [1], "logit_bias": [{}],
        "tools": [[]], "functions": [[]], "tool_choice": ["none"], "function_call": ["none"],
        "best_of": [1], "suffix": [""], "modalities": [["text"]],
        "store": [False], "min_p": [0], "min_tokens": [0]}
_WHY = {"tools": "tool calling is not supported", "functions": "function calling is not supported",
        "tool_choice": "tool calling is not supported", "function_call": "function calling is not supported",
        "parallel_tool_calls": "tool calling is not supported",
        "logit_bias": "logit biases are not applied", "best_of": "hasten returns one sequence per request",
        "presence_penalty": "penalties are not applied", "frequency_penalty": "penalties are not applied",
        "repetition_penalty": "penalties are not applied"}
_IGNORABLE = {"metadata"}  # only ever read by the provider's dashboard (with store); changes no output


def unsupported_fields(req: BaseModel, where: str = "") -> None:
    """Raise a 400 naming the first field the request sets that hasten would not honour."""
    for name, value in (req.model_extra or {}).items():
        if value is None or name in _IGNORABLE or value in _OFF.get(name, []):
            continue
        field = f"{where}{name}"
        why = _WHY.get(name, "hasten does not support this field")
        raise APIError(400, f"{field}: {why}; remove it from the request", param=field, code="unsupported_field")
    if isinstance(req, _Common) and req.n not in (None, 1):
        raise APIError(400, f"n: hasten returns one choice per request (got n = {req.n}); send n = 1 or leave it out",
                       param="n", code="unsupported_field")


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as {role, content: str}; content may be a string or a list of text parts (joined by newlines)."""
    unsupported_fields(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
    out = []
    for i, m in enumerate(req.messages):
        unsupported_fields(m, f"messages[{i}].")
        content = m.content
        if content is None:
            raise APIError(400, f"messages[{i}].content: required (a string or a list of text parts)",
                           param=f"messages[{i}].content", code="invalid_value")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    what = f"part type {kind!r} is not supported" if kind else "each part must be an object with a type"
                    raise APIError(400, f"{where}: {what}; hasten serves text only: send "
                                   '{"type": "text", "text": ...} parts', param=f"{where}.type", code="invalid_value")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.text: required (a string)", param=f"{where}.text",
                                   code="invalid_value")
                extra = [k for k in part if k not in ("type", "text")]
                if extra:
                    raise APIError(400, f"{where}.{extra[0]}: hasten does not support this field; remove it",
                                   param=f"{where}.{extra[0]}", code="unsupported_field")
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append({"role": m.role, "content": content})
    return out


def completion_prompt(req: CompletionRequest, vocab_size: int) -> str | list[int]:
    """The one prompt of a completion request: a string or a list of token ids."""
    unsupported_fields(req)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: hasten serves one prompt per request (got {len(prompt)})", param="prompt",
                           code="invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "prompt: empty; send some text or token ids", param="prompt", code="invalid_value")
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0 … {vocab_size - 1})",
                           param="prompt", code="invalid_value")
    return prompt
