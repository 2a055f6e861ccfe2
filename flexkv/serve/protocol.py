"""The OpenAI-compatible protocol of `flexkv serve`: the request and response bodies as pydantic
models (as vLLM's `entrypoints/openai/protocol.py`). Strict types, unknown fields forbidden; the
OpenAI fields this server does not implement are accepted only at their neutral values
(`Neutral`). `flexkv.serve.api` turns validation errors into OpenAI-shaped 400s and these
bodies into engine requests."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator,
                      model_validator)

from flexkv.serve.json_schema import compile_schema
from flexkv.serve.request import MAX_LOGPROBS, MAX_REPETITION_PENALTY

MAX_PROMPT_CHARS = 4_000_000     # a body bound before tokenizing; the token limit is the engine's
MAX_PROMPTS = 256                # prompts, and choices (n x prompts), in one request (the queue
                                 # bounds them too)
MAX_STOP = 16                    # stop strings per request
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 16384             # a conversation's messages (validating each costs ~4 us)
MAX_LOGIT_BIAS = 131072          # logit_bias entries (at least any LLaMA / Mistral vocabulary)
MAX_TOOLS = 128                  # functions a chat request may offer (as OpenAI's API)
# Lists and maps are counted before their items are validated ("before" validators), so an
# oversized body is refused at once instead of holding the event loop (2,000,000 messages,
# 66 MB, took 8.6 s to validate)


def _at_most(v, most: int, what: str):
    if isinstance(v, (list, dict)) and len(v) > most:
        raise ValueError(f"at most {most} {what}, got {len(v)}")
    return v


# --------------------------------------------------------------------------- request models
_STRICT = ConfigDict(strict=True, extra="forbid")


class Neutral:
    """OpenAI fields this server does not implement: accepted only at these (neutral) values."""

    COMPLETION = {"suffix": (None, "")}
    CHAT = {"functions": (None, []),
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
    logit_bias: dict[str, Bias] | None = Field(None, max_length=MAX_LOGIT_BIAS, description=(
        "{token id (a string of digits): a bias in [-100, 100] added to its logit}"))
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
            return v        # (its schema is compiled off the event loop: `compile_schemas`)
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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_count(cls, v):
        return _at_most(v, MAX_LOGIT_BIAS, "logit_bias entries")

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v):
        for k in v or {}:
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"keys must be token ids (strings of digits), got {k!r}")
        return v

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None

    @field_validator("stop", "stop_token_ids", mode="before")
    @classmethod
    def _stop_count(cls, v, info):
        return _at_most(v, MAX_STOP, "stop strings" if info.field_name == "stop" else
                        "stop_token_ids")

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

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_count(cls, v):   # token ids, or a batch's prompts and the token ids in them
        _at_most(v, MAX_PROMPT_CHARS, "token ids (or prompts) in prompt")
        if isinstance(v, list):
            inner = sum(len(p) for p in v if isinstance(p, list))
            if inner > MAX_PROMPT_CHARS:
                raise ValueError(f"at most {MAX_PROMPT_CHARS} token ids in the batch's prompts "
                                 f"in all, got {inner}")
        return v

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


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message; an assistant's may hold `tool_calls` (its content then may be null), a tool's
    answers one of them (`tool_call_id`)."""
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_the_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant's with "
                             "tool_calls may have none)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may have tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id (the call it answers), and only it")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as chat templates take it (transformers' convention: a call's arguments
        as a dict where they are JSON)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON Schema of the arguments (absent: none)")
    strict: bool | None = Field(None, description="accepted; the arguments always follow the schema")

    def schema(self) -> dict:
        return {"type": "object", "properties": {}} if self.parameters is None else self.parameters


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


def _rebase(schema, prefix: str):
    """`schema` with its `$defs` / `definitions` lifted out and every `$ref` into them (or to its
    root, `#`) renamed under `prefix`, to sit in a larger schema: (the schema, its defs)."""
    if not isinstance(schema, dict):
        return schema, {}
    defs = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs |= {f"{prefix}.{name}": sub for name, sub in schema[key].items()}

    def rename(node):
        if isinstance(node, list):
            return [rename(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k in ("enum", "const", "default", "examples"):
                out[k] = v
            elif k == "$ref" and isinstance(v, str):
                parts = v.split("/")
                out[k] = (f"#/$defs/{prefix}" if v == "#" else f"#/$defs/{prefix}.{parts[2]}"
                          if len(parts) == 3 and parts[1] in ("$defs", "definitions") else v)
            else:
                out[k] = rename(v)
        return out
    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    out_defs = {name: rename(sub) for name, sub in defs.items()}
    out_defs[prefix] = rename(body)
    return {"$ref": f"#/$defs/{prefix}"}, out_defs


class ChatFields(BaseModel):
    """The conversation and its tools: what makes a chat prompt (`/v1/chat/completions`,
    `/tokenize`) and, with tools, the schema its reply is generated under (tool_calls.py)."""
    model_config = _STRICT

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description=(
        "functions the model may call; the reply's calls always follow their parameters' schemas"))
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, validate_default=True, description="'auto' (the default with tools: a call or a "
        "text reply, the model's choice), 'none', 'required' or {\"type\": \"function\", "
        "\"function\": {\"name\": ...}}")
    parallel_tool_calls: bool | None = Field(None, description="with tool_choice 'auto', whether "
                                             "a reply may hold several calls (default true); "
                                             "'required' and a named function give one")

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, v):
        _at_most(v, MAX_MESSAGES, "messages")
        if isinstance(v, list):   # the items inside them too: text parts and tool calls, in all
            inner = sum(len(m[k]) for m in v if isinstance(m, dict)
                        for k in ("content", "tool_calls") if isinstance(m.get(k), list))
            if inner > MAX_MESSAGES:
                raise ValueError(f"at most {MAX_MESSAGES} content parts and tool calls in all "
                                 f"the messages, got {inner}")
        return v

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        total = sum(len(m.text()) for m in v)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages are too long ({total} characters, at most {MAX_PROMPT_CHARS})")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _tool_count(cls, v):
        return _at_most(v, MAX_TOOLS, "tools")

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: each function needs a name of its own")
        return v            # (their schemas are compiled off the event loop: `compile_schemas`)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v, info):
        tools = info.data.get("tools")
        if v not in (None, "none"):
            if not tools:
                raise ValueError("a tool_choice other than 'none' needs tools")
            if isinstance(v, NamedToolChoice) and v.function.name not in {
                    t.function.name for t in tools}:
                raise ValueError(f"tool_choice names {v.function.name!r}, which is not among "
                                 "the tools")
        return v

    def tool_mode(self) -> str | None:
        """How the reply uses the tools: "auto" (a call or a text reply), "required" (a call of
        any of them), "named" (a call of the named one), or None (plain text)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def named_tool(self) -> str | None:
        """The function a named tool_choice calls, else None."""
        return self.tool_choice.function.name if self.tool_mode() == "named" else None

    def call_schema(self) -> dict:
        """The JSON Schema of the reply (tool_calls.py), for a `tool_mode()`:
        - named: the function's parameters;
        - required: {"name": one of the tools, "arguments": its parameters}, in that order;
        - auto: {"tool_calls": [such calls, one or more]} or {"response": text}."""
        mode = self.tool_mode()
        params = {t.function.name: t.function.schema() for t in self.tools}
        if mode == "named":
            return params[self.named_tool()]
        defs, calls = {}, []
        for i, name in enumerate(params):
            ref, more = _rebase(params[name], f"tool{i}")
            defs |= more
            calls.append({"type": "object", "properties": {"name": {"const": name},
                                                           "arguments": ref},
                          "required": ["name", "arguments"]})
        if mode == "required":
            return {"$defs": defs, "anyOf": calls}
        many = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if self.parallel_tool_calls is False:
            many["maxItems"] = 1
        return {"$defs": defs, "anyOf": [
            {"type": "object", "properties": {"tool_calls": many}, "required": ["tool_calls"]},
            {"type": "object", "properties": {"response": {"type": "string"}},
             "required": ["response"]}]}


class ChatCompletionRequest(ChatFields, SamplingFields):
    """`POST /v1/chat/completions`."""

    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="default: as many as fit "
                                   "(at most the server's --max-new-tokens)")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1,
                                              description="OpenAI's newer name of max_tokens")
    logprobs: bool | None = Field(None, description="each token's logprob (the model's "
                                  "distribution, before temperature, top-k and top-p)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the k most likely "
                                     "tokens' logprobs at each token; needs logprobs=true")
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

    @model_validator(mode="after")
    def _tools_or_format(self):
        if self.tool_mode() is not None and self.format_type() != "text":
            raise ValueError("tools beside a response_format: the reply is a call or the tools' "
                             "text reply; give tool_choice 'none' or no response_format")
        return self

    @field_validator(*Neutral.CHAT)
    @classmethod
    def _neutral(cls, v, info):
        return Neutral.check(Neutral.CHAT, info.field_name, v)


class SchemaError(ValueError):
    """A request's schema that cannot be compiled: the message, and the field it is in."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def schemas(req):
    """(schema, where it is, its field) for each JSON Schema a request holds, in order (lazily:
    the reply's schema of a tool call is made only when the tools' own have been taken)."""
    if isinstance(req, SamplingFields) and req.schema() is not None:
        yield req.schema(), "response_format", "response_format"
    if isinstance(req, ChatFields) and req.tools:
        for t in req.tools:
            yield t.function.schema(), f"tools: function {t.function.name!r}: parameters", "tools"
        if req.tool_mode() is not None:
            yield (req.call_schema(), "tools: the reply's schema (every function's parameters, "
                   "with the call format)", "tools")


def compile_schemas(req) -> None:
    """Compile every JSON Schema a request holds (its `response_format`'s; each tool's
    parameters and, where the reply may call them, the reply's schema), as the engine will
    (`compile_schema` keeps them, so the engine's compile is a lookup), or raise `SchemaError`
    naming the field. The server runs this in a worker thread: a schema's compile (up to ~0.1 s)
    never holds the event loop that streams the other requests."""
    for schema, where, param in schemas(req):
        try:
            compile_schema(schema)
        except ValueError as e:
            raise SchemaError(f"{where}: {e}", param) from None


class TokenizeCompletionRequest(BaseModel):
    """`POST /tokenize` of a prompt (as vLLM's): its token ids as /v1/completions takes them."""
    model_config = _STRICT
    model: str | None = Field(None, description="the served model's name (optional)")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    add_special_tokens: bool = Field(True, description="the tokenizer's special tokens (its BOS), "
                                     "as /v1/completions adds them to a string prompt")
    return_token_strs: bool = Field(False, description="each token's text too")


class TokenizeChatRequest(ChatFields):
    """`POST /tokenize` of a conversation (as vLLM's): the prompt /v1/chat/completions makes of
    these messages and tools."""
    model: str | None = Field(None, description="the served model's name (optional)")
    add_generation_prompt: bool = Field(True, description="end with the assistant turn's header, "
                                        "as /v1/chat/completions does")
    return_token_strs: bool = Field(False, description="each token's text too")


TOKENIZE_TAGS = ("tokenize-prompt", "tokenize-chat")     # in a validation error's location


def _tokenize_kind(body) -> str:
    return TOKENIZE_TAGS[isinstance(body, dict) and "messages" in body]


TokenizeRequest = Annotated[Annotated[TokenizeCompletionRequest, Tag(TOKENIZE_TAGS[0])]
                            | Annotated[TokenizeChatRequest, Tag(TOKENIZE_TAGS[1])],
                            Discriminator(_tokenize_kind)]


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` (as vLLM's): token ids to text."""
    model_config = _STRICT
    model: str | None = Field(None, description="the served model's name (optional)")
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_PROMPT_CHARS)

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_count(cls, v):
        return _at_most(v, MAX_PROMPT_CHARS, "token ids")


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
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


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


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: str
