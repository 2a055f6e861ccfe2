"""The OpenAI-compatible protocol of `flexkv serve`: the request and response bodies as pydantic
models (as vLLM's `entrypoints/openai/protocol.py`). Strict types, unknown fields forbidden; the
OpenAI fields this server does not implement are accepted only at their neutral values
(`Neutral`). `flexkv.serve.api` turns validation errors into OpenAI-shaped 400s and these
bodies into engine requests."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flexkv.serve.json_schema import compile_schema
from flexkv.serve.request import MAX_LOGPROBS, MAX_REPETITION_PENALTY

MAX_PROMPT_CHARS = 4_000_000     # a body bound before tokenizing; the token limit is the engine's
MAX_PROMPTS = 256                # prompts, and choices (n x prompts), in one request (the queue
                                 # bounds them too)
MAX_STOP = 16                    # stop strings per request
MAX_STOP_CHARS = 1024


# --------------------------------------------------------------------------- request models
_STRICT = ConfigDict(strict=True, extra="forbid")


class Neutral:
    """OpenAI fields this server does not implement: accepted only at these (neutral) values."""

    COMPLETION = {"suffix": (None, "")}
    CHAT = {"tools": (None, []), "tool_choice": (None, "none"),
            "parallel_tool_calls": (None, True, False), "functions": (None, []),
            "function_call": (None, "none"),
            "modalities": (None, ["text"]), "store": (None, False),
            "service_tier": (None, "auto", "default")}

    @staticmethod
    def same(value, allowed) -> bool:
        """Equal as JSON values (false is not 0, 0 and 0.0 are the same number)."""
        if value is None or allowed is None or isinstance(value, bool) or isinstance(allowed, bool):
            return value is allowed
        if isinstance(allowed, (int, float)):
            return isinstance(value, (int, float)) and value == allowed
        return type(value) is type(allowed) and value == allowed

    @staticmethod
    def check(table: dict, name: str, value):
        allowed = table[name]
        if not any(Neutral.same(value, a) for a in allowed):
            shown = " or ".join(json.dumps(a) for a in allowed)
            raise ValueError(f"not supported by this server; only {shown} is accepted")
        return value


Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
_TOKEN_ID = re.compile(r"[0-9]{1,12}")
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")   # OpenAI's


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = Field(False, description="send a last chunk with `usage` (and no choices)")


class SamplingFields(BaseModel):
    model_config = _STRICT

    model: str | None = Field(None, description="the served model's name (optional)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description="0 = greedy (OpenAI's default is 1)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=1_000_000, description="extension: 0 or -1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} stop strings; the "
                                         "text ends before the first one (not included)")
    n: int = Field(1, ge=1, le=MAX_PROMPTS, description="choices per prompt (each its own engine "
                   "request; with `seed` s, choice j samples with seed s + j)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: do not stop at the end-of-sequence token")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP, description=f"extension: up "
                                             f"to {MAX_STOP} more token ids that end the text (not "
                                             "included), as vLLM's")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False, description=
                                           "subtracted from the logit of every token already in "
                                           "the output (null = 0)")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False, description=
                                            "times the token's count in the output so far, "
                                            "subtracted from its logit (null = 0)")
    logit_bias: dict[str, Bias] | None = Field(None, description="{token id (a string of digits): "
                                               "a bias in [-100, 100] added to its logit}")
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
                                      description="extension, as vLLM's: the logit of a token in "
                                      "the prompt or the output so far is divided by it where "
                                      "positive, multiplied where not (1 = off)")
    min_tokens: int = Field(0, ge=0, le=2**31 - 1, description="extension, as vLLM's: no stop "
                            "(end of sequence, stop_token_ids, stop strings) before this many "
                            "tokens; at most max_tokens")
    user: str | None = Field(None, description="ignored")
    response_format: dict | None = Field(None, description='{"type": "text"} (the default), '
                                         '{"type": "json_object"} (the text is one JSON object) or '
                                         '{"type": "json_schema", "json_schema": {"name": ..., '
                                         '"schema": {...}}} (one JSON value of the schema); an '
                                         "extension for completions, as vLLM's")

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if set(v) != {"type", "json_schema"} or not isinstance(spec, dict):
                raise ValueError('response_format of type "json_schema" must be {"type": '
                                 '"json_schema", "json_schema": {"name": ..., "schema": {...}}}')
            unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
            if unknown:
                raise ValueError(f"response_format.json_schema: unknown field {unknown[0]!r} "
                                 "(known: name, schema, strict, description)")
            name = spec.get("name")
            if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
                raise ValueError("response_format.json_schema.name must be 1-64 characters of "
                                 f"a-z, A-Z, 0-9, _ and -, got {name!r}")
            if "schema" not in spec:
                raise ValueError("response_format.json_schema.schema is required (the JSON Schema "
                                 "the text must follow)")
            if not isinstance(spec.get("strict", False), (bool, type(None))):
                raise ValueError("response_format.json_schema.strict must be a bool or null "
                                 "(flexkv always holds the text to the schema)")
            compile_schema(spec["schema"])   # a ValueError naming what it holds that is not supported
            return v
        if set(v) != {"type"} or kind not in ("text", "json_object"):
            more = f" ({kind!r} is not supported)" if isinstance(kind, str) else ""
            raise ValueError('response_format must be {"type": "text"}, {"type": "json_object"} or '
                             '{"type": "json_schema", "json_schema": {...}}' + more)
        return v

    def format_type(self) -> str:
        return "text" if self.response_format is None else self.response_format["type"]

    def schema(self):
        """The JSON Schema of a `json_schema` response format, else None."""
        if self.format_type() != "json_schema":
            return None
        return self.response_format["json_schema"]["schema"]

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for k in v or {}:
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"keys must be token ids (strings of digits), got {k!r}")
        return v

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, "
                                 f"got {len(s)}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="a non-empty string or a non-empty list of token ids; or a batch of such "
        f"prompts (a list of strings or of token-id lists, at most {MAX_PROMPTS}), one choice each")
    max_tokens: int | None = Field(None, ge=0, le=2**31 - 1, description="default 16 (at most the "
                                   "server's --max-new-tokens); 0 only with echo (the prompt "
                                   "alone, scored with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="each token's "
                                 "logprob and the k most likely tokens' (the model's distribution, "
                                 "before temperature, top-k and top-p)")
    echo: bool | None = Field(None, description="the prompt's text before the completion's; with "
                              "logprobs, the prompt tokens' too (the first one's null), as the "
                              "prefill computed them")
    best_of: int | None = Field(None, ge=1, le=MAX_PROMPTS, description="candidates per prompt "
                                "(at least n; with seed s, candidate j samples with seed s + j): "
                                "the n with the highest mean logprob per token are returned, best "
                                "first; not with stream")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if len(v) == 0:
            raise ValueError("the prompt must not be empty")
        batch = isinstance(v, list) and not isinstance(v[0], int)
        if batch and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        prompts = v if batch else [v]
        for i, p in enumerate(prompts):
            at = f" (item {i} of the batch)" if batch else ""
            if len(p) == 0:
                raise ValueError(f"the prompt must not be empty{at}")
            if isinstance(p, list) and any(t < 0 for t in p):
                raise ValueError(f"token ids must be >= 0{at}")
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        if chars > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is too long ({chars} characters, at most {MAX_PROMPT_CHARS})")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be >= n, got best_of={self.best_of} and n={self.n}")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of > 1 cannot be streamed (the best are known at the end)")
        return self

    def batched(self) -> bool:
        """A list of prompts (strings or token-id lists), not one prompt."""
        return not isinstance(self.prompt, str) and not isinstance(self.prompt[0], int)

    def prompt_list(self) -> list:
        """The prompts of this request: one, or the batch's (each a string or token ids)."""
        return list(self.prompt) if self.batched() else [self.prompt]

    @field_validator(*Neutral.COMPLETION)
    @classmethod
    def _neutral(cls, v, info):
        return Neutral.check(Neutral.COMPLETION, info.field_name, v)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="default: as many as fit "
                                   "(at most the server's --max-new-tokens)")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1,
                                              description="OpenAI's newer name of max_tokens")
    logprobs: bool | None = Field(None, description="each token's logprob (the model's "
                                  "distribution, before temperature, top-k and top-p)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the k most likely "
                                     "tokens' logprobs at each token; needs logprobs=true")
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = Field(None, description="ignored")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        total = sum(len(m.text()) for m in v)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages are too long ({total} characters, at most {MAX_PROMPT_CHARS})")
        return v

    @field_validator(*Neutral.CHAT)
    @classmethod
    def _neutral(cls, v, info):
        return Neutral.check(Neutral.CHAT, info.field_name, v)


# --------------------------------------------------------------------------- response models
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The completions API's logprobs: per token its text, logprob, the most likely tokens'
    logprobs (the chosen token's included, so up to k + 1 entries) and its offset in the text."""
    tokens: list[str]
    token_logprobs: list[float | None]           # None: a prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flexkv"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
