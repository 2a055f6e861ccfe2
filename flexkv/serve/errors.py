"""OpenAI-shaped errors of the HTTP server: `APIError` (raised by a route, answered by the app's
handler), `error_response` (the JSON body `{"error": {"message", "type", "param", "code"}}`),
and the translation of pydantic's validation errors, and of the engine's `ValueError`s, into one
readable message and the request field it concerns (OpenAI's `param`)."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from flexkv.serve.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                   DetokenizeRequest, StreamOptions, TextPart, TokenizeChatRequest,
                                   TokenizeCompletionRequest, TOKENIZE_TAGS)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_names() -> set[str]:
    names = set()
    for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions,
              TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest):
        names.update(m.model_fields)
    return names


_FIELDS = _field_names()


def validation_message(errors) -> tuple[str, str | None]:
    """pydantic errors -> (one readable message, the top-level field) for the 400 body."""
    parts, param = [], None
    for err in errors:
        loc = [x for x in err.get("loc", ()) if x != "body" and x not in TOKENIZE_TAGS]
        typ = err.get("type", "")
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if typ == "json_invalid":
            ctx = (err.get("ctx") or {}).get("error", "")
            pos = loc[0] if loc and isinstance(loc[0], int) else None
            return (f"Malformed JSON in the request body: {ctx or 'could not parse'}"
                    + (f" (at character {pos})" if pos is not None else ""), None)
        if typ == "missing" and not loc:
            return "The request body must be a JSON object (got an empty body)", None
        if typ in ("model_attributes_type", "model_type", "dict_type") and not loc:
            return "The request body must be a JSON object", None
        if typ == "extra_forbidden" and loc:
            parts.append(f"Unrecognized request argument supplied: {loc[-1]}")
            param = param or str(loc[0])
            continue
        # keep real field names and list indices; drop pydantic's union-member tags
        path = [x for x in loc if isinstance(x, int) or x in _FIELDS]
        name = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else x)
                       for i, x in enumerate(path))
        parts.append(f"{name}: {msg}" if name else msg)
        if param is None and path and isinstance(path[0], str):
            param = path[0]
        elif param is None and not path and msg.split(" ", 1)[0] in _FIELDS:
            param = msg.split(" ", 1)[0]   # a check of several fields names the first one
    seen = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    if len(seen) > 4:
        seen = seen[:4] + [f"... ({len(seen) - 4} more)"]
    return "; ".join(seen) or "invalid request", param


_ENGINE_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "prompt", "n",
                  "stop_token_ids", "logprobs", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "logit_bias", "min_tokens")


def engine_error_param(message: str, chat: bool) -> str | None:
    head = message.split(maxsplit=1)[0].rstrip(":,") if message else ""
    if head.startswith("prompt"):
        return "messages" if chat else "prompt"
    return head if head in _ENGINE_PARAMS else None
