"""Forced tool calls on the chat API (`tool_choice` "required" or a named function).

The reply is generated under a JSON Schema (`ChatCompletionRequest.call_schema`): a named
function's `parameters`, or for "required" `{"name": one of the tools, "arguments": its
parameters}` with the name first. `ToolCallReply` turns one choice's generated text into
OpenAI's message (`content` null, one `tool_calls` entry, finish reason "tool_calls" once the
call is complete) and, streaming, into its deltas: a named call's arguments as they come; a
"required" call whole, with its finish reason, since its name is part of the text.
"""
from __future__ import annotations

import json
import re
import uuid

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallReply:
    """One choice's call: `named` is the function's name when the request named it, else None
    (the text names it)."""

    def __init__(self, named: str | None):
        self.named, self.text = named, ""
        self.id = f"call_{uuid.uuid4().hex[:24]}"

    def _complete(self) -> bool:
        try:
            json.loads(self.text)
            return True
        except ValueError:
            return False

    def call(self) -> tuple[str | None, str, bool]:
        """(the function's name, None where the text was cut before it; the arguments' text;
        whether the call is complete)."""
        complete = self._complete()
        if self.named is not None:
            return self.named, self.text.strip(), complete
        head = _HEAD.match(self.text)
        if head is None:
            return None, "", complete
        args = self.text[head.end():].rstrip()
        return head[1], args[:-1].rstrip() if complete else args, complete   # less the wrapper's }

    def _entry(self, name: str, args: str) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": name, "arguments": args}}

    def message(self, text: str, reason: str) -> tuple[str | None, list | None, str]:
        """The whole reply: (content, tool_calls, finish reason) for the generated `text` and
        the engine's finish reason; a text cut before the function's name stays content."""
        self.text = text
        name, args, complete = self.call()
        if name is None:
            return text, None, reason
        return None, [self._entry(name, args)], "tool_calls" if complete else reason

    def first_delta(self) -> dict:
        delta = {"role": "assistant", "content": None}
        if self.named is not None:
            delta["tool_calls"] = [{"index": 0, **self._entry(self.named, "")}]
        return delta

    def delta(self, piece: str, reason: str | None) -> tuple[dict, str | None]:
        """The delta for newly generated `piece` (and, at the end, the finish `reason`)."""
        self.text += piece
        if self.named is not None:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
            return delta, (None if reason is None else "tool_calls" if self._complete() else reason)
        if reason is None:
            return {}, None           # the name is in the text: the call goes out whole at the end
        content, calls, reason = self.message(self.text, reason)
        if calls is None:
            return {"content": content}, reason
        return {"tool_calls": [{"index": 0, **calls[0]}]}, reason
