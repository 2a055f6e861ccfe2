"""The server's OpenAPI schema, made to say what the server accepts (schemathesis fuzzes the
API from it, and clients read it)."""
from __future__ import annotations

from fastapi import FastAPI

from flexkv.serve.middleware import needs_key
from flexkv.serve.protocol import (MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS,
                                   Neutral)


def clean_openapi(app: FastAPI, model_name: str, engine, keyed: bool = False) -> None:
    """The app's OpenAPI schema says what this server accepts: the 400 error body instead of
    FastAPI's 422 (never sent here), the served model's name, `max_tokens` up to the engine's
    `max_new_tokens`, token ids below the vocabulary size, the single neutral value accepted
    for each OpenAI field that is not implemented, and (`keyed`) the bearer key the API's paths
    need."""
    original = app.openapi
    vocab = getattr(getattr(getattr(engine, "model", None), "args", None), "vocab_size", None)

    def limit(prop: dict, **bounds):
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "integer":
                branch.update(bounds)

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
            if keyed:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "apiKey": {"type": "http", "scheme": "bearer",
                               "description": "the server's --api-key"}}
                for path, item in schema.get("paths", {}).items():
                    for op in item.values():
                        if needs_key(path) and isinstance(op, dict):
                            op["security"] = [{"apiKey": []}]
                            op.setdefault("responses", {})["401"] = {
                                "description": "no API key, or a wrong one",
                                "content": {"application/json": {"schema": {
                                    "$ref": "#/components/schemas/ErrorResponse"}}}}
            comps = schema.get("components", {}).get("schemas", {})
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
            batch = min(MAX_PROMPTS, int(engine.max_waiting))   # choices (n x prompts) per request
            for comp, table in (("CompletionRequest", Neutral.COMPLETION),
                                ("ChatCompletionRequest", Neutral.CHAT)):
                props = comps.get(comp, {}).get("properties", {})
                if "model" in props:
                    props["model"] = {"title": "Model", "enum": [model_name, None],
                                      "description": "the served model's name (optional)"}
                for key in ("max_tokens", "max_completion_tokens"):
                    if key in props:
                        limit(props[key], maximum=int(engine.max_new_tokens))
                for name, allowed in table.items():
                    if name in props:
                        props[name] = {"title": props[name].get("title", name), "enum": list(allowed),
                                       "description": "not implemented: only this neutral value"}
                if "n" in props:
                    props["n"]["maximum"] = batch
                for branch in props.get("prompt", {}).get("anyOf", []):
                    if branch.get("type") == "string":
                        branch.update(minLength=1, maxLength=MAX_PROMPT_CHARS)
                    elif branch.get("type") == "array":
                        branch["minItems"] = 1
                        items = branch.setdefault("items", {})
                        if items.get("type") == "string":       # a batch of strings
                            branch["maxItems"] = batch
                            items.update(minLength=1, maxLength=MAX_PROMPT_CHARS // batch)
                            continue
                        if items.get("type") == "array":        # a batch of token-id lists
                            branch["maxItems"] = batch
                            items["minItems"] = 1
                            items = items.setdefault("items", {})
                        items["minimum"] = 0
                        if vocab:
                            items["maximum"] = int(vocab) - 1
                for branch in props.get("logit_bias", {}).get("anyOf", []):
                    if branch.get("type") == "object":
                        branch["propertyNames"] = {"pattern": "^[0-9]{1,12}$"}
                for branch in props.get("stop_token_ids", {}).get("anyOf", []):
                    if branch.get("type") == "array":
                        branch.setdefault("items", {})["minimum"] = 0
                        if vocab:
                            branch["items"]["maximum"] = int(vocab) - 1
                for branch in props.get("stop", {}).get("anyOf", []):
                    if branch.get("type") == "string":
                        branch.update(minLength=1, maxLength=MAX_STOP_CHARS)
                    elif branch.get("type") == "array":
                        branch["maxItems"] = MAX_STOP
                        branch.setdefault("items", {}).update(minLength=1, maxLength=MAX_STOP_CHARS)
            tokens = comps.get("DetokenizeRequest", {}).get("properties", {}).get("tokens", {})
            if "items" in tokens:               # ids the tokenizer decodes
                tokens["items"]["maximum"] = len(engine.tokenizer) - 1
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def version() -> str:
    try:
        from flexkv import __version__
        return __version__
    except Exception:  # noqa: BLE001
        return "0"
