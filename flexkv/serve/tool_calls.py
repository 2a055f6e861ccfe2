"""Tool calls on the chat API: the prompt that offers the tools and the reply that makes calls.

Every reply that may call a tool is generated under a JSON Schema
(`ChatCompletionRequest.call_schema`), so its calls always name a tool and their arguments always
follow its parameters; the model's own tool-call format (which differs from model to model and
would need a parser each) plays no part:
- a named `tool_choice`: the function's arguments (`CallReply` with the name);
- "required": `{"name": one of the tools, "arguments": its arguments}` (`CallReply`);
- "auto" (the default with tools): `{"tool_calls": [such calls]}` or `{"response": text}`, the
  model's choice (`AutoReply`), as llama.cpp's generic tool format does for models without one of
  their own.

The prompt (`tool_messages`): "auto" states the tools and that format in a system message of its
own (`instruction`) and shows earlier assistant turns in it; the chat template's own tool rendering
is not used there, since it would ask for another format. A forced call keeps the template's
rendering (`tools=`), and gets the instruction only where the template ignores the tools.

A reply turns the generated text into OpenAI's message (`content`, `tool_calls`, finish reason
"tool_calls" once the calls are complete) and, streaming, into deltas as OpenAI streams them:
an "auto" text reply's characters as they come; a call (its id, type and name) once its name is
complete (a named function's at once), then its arguments as they grow (`_Streamed`).
"""
from __future__ import annotations

import json
import re
import uuid

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]*)"\s*,\s*"arguments"\s*:\s*')
_RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_CALLS = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_SEP = re.compile(r'\s*,?\s*')
_CLOSE = re.compile(r'\s*\}')
_DECODER = json.JSONDecoder()


# ----------------------------------------------------------------------------- the prompt
def instruction(tools: list[dict], mode: str, named: str | None = None) -> str:
    """The system text that offers `tools` (OpenAI's `{"type": "function", "function": {...}}`)
    and says what to reply in `mode` ("auto", "required" or "named")."""
    listed = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    head = f"You can call these functions (their arguments are JSON Schemas):\n{listed}\n"
    if mode == "named":
        return head + f"Reply with the arguments of a call of {named}, as a JSON object."
    call = '{"name": <a function\'s name>, "arguments": <its arguments>}'
    if mode == "required":
        return head + f"Reply with one call, as JSON: {call}"
    return head + (f'Reply with JSON: {{"tool_calls": [{call}, ...]}} to call functions, or '
                   '{"response": <your reply>} to answer without them.')


def _as_auto_turn(msg: dict) -> dict:
    """An earlier assistant message as an "auto" reply would have read."""
    if msg["role"] != "assistant":
        return msg
    if msg.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in msg["tool_calls"]]
        text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
    else:
        text = json.dumps({"response": msg["content"]}, ensure_ascii=False)
    return {k: v for k, v in msg.items() if k != "tool_calls"} | {"content": text}


def with_system(msgs: list[dict], text: str) -> list[dict]:
    """`msgs` with `text` at the end of the leading system message, or in a new one before them."""
    if msgs and msgs[0]["role"] == "system":
        return [msgs[0] | {"content": f"{msgs[0]['content']}\n\n{text}"}] + msgs[1:]
    return [{"role": "system", "content": text}] + msgs


def tool_messages(render, msgs: list[dict], tools: list[dict], mode: str | None,
                  named: str | None = None) -> str:
    """The prompt text of a chat request: `render(msgs, **kwargs)` is the chat template."""
    if mode is None:
        return render(msgs, tools=tools) if tools else render(msgs)
    if mode == "auto":
        return render(with_system([_as_auto_turn(m) for m in msgs], instruction(tools, mode)))
    text = render(msgs, tools=tools)
    if text != render(msgs):           # the template renders the tools itself
        return text
    return render(with_system(msgs, instruction(tools, mode, named)), tools=tools)


# ----------------------------------------------------------------------------- the reply
def reply(mode: str, named: str | None = None) -> CallReply | AutoReply:
    """The reply of one choice in a `tool_mode` ("auto", "required", "named" with the name)."""
    return AutoReply() if mode == "auto" else CallReply(named)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _entry(call_id: str, name: str, args: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _complete(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _one_call(text: str) -> tuple[str | None, str, bool, int]:
    """A `{"name": ..., "arguments": ...}` call at the start of `text`: (its name, None where
    the text ends before it; the arguments' text; whether the call is complete; where it ends)."""
    head = _HEAD.match(text)
    if head is None:
        return None, "", False, len(text)
    try:
        end = _DECODER.raw_decode(text, head.end())[1]
    except ValueError:
        return head[1], text[head.end():].rstrip(), False, len(text)
    close = _CLOSE.match(text, end)
    if close is None:
        return head[1], text[head.end():end], False, len(text)
    return head[1], text[head.end():end], True, close.end()


def string_prefix(body: str) -> tuple[str, bool]:
    """The characters of a JSON string's body (the text after its opening quote) as far as they
    are known: (the decoded text, whether the string has ended). An escape cut short waits. (The
    grammar makes the text valid JSON; should it not be, the body comes back undecoded.)"""
    i, n = 0, len(body)
    try:
        while i < n:
            if body[i] == '"':
                return json.loads(f'"{body[:i]}"'), True
            if body[i] != "\\":
                i += 1
            elif i + 1 < n and body[i + 1] != "u":
                i += 2
            elif i + 6 > n:
                break
            elif 0xD800 <= int(body[i + 2:i + 6], 16) < 0xDC00:    # a surrogate pair: \uD8xx\uDCxx
                if i + 12 > n:
                    break
                i += 12
            else:
                i += 6
        return json.loads(f'"{body[:i]}"'), False
    except ValueError:
        return body, False


class _Streamed:
    """What of each call a stream has sent: a call goes out with its id and name (and the
    arguments known so far) once its name is complete, then its arguments as they grow."""

    def __init__(self):
        self.args: list[str] = []         # per call: its arguments' text sent so far

    def deltas(self, calls: list) -> list:
        out = []
        for i, call in enumerate(calls):
            args = call["function"]["arguments"]
            if i == len(self.args):
                self.args.append(args)
                out.append({"index": i, **call})
            elif len(args) > len(self.args[i]):     # (the text known grows: args extend)
                out.append({"index": i, "function": {"arguments": args[len(self.args[i]):]}})
                self.args[i] = args
        return out


def _tool_delta(entries: list) -> dict:
    return {"tool_calls": entries} if entries else {}


class CallReply:
    """A forced call: `named` is the function's name when the request named it (the text is its
    arguments), else None (the text is `{"name": ..., "arguments": ...}`)."""

    def __init__(self, named: str | None):
        self.named, self.text, self.id, self.streamed = named, "", _call_id(), _Streamed()

    def call(self) -> tuple[str | None, str, bool]:
        """(the function's name, None where the text was cut before it; the arguments' text;
        whether the call is complete)."""
        if self.named is not None:
            return self.named, self.text.strip(), _complete(self.text)
        return _one_call(self.text)[:3]

    def message(self, text: str, reason: str) -> tuple[str | None, list | None, str]:
        """The whole reply: (content, tool_calls, finish reason) for the generated `text` and
        the engine's finish reason; a text cut before the function's name stays content."""
        self.text = text
        name, args, complete = self.call()
        if name is None:
            return text, None, reason
        return None, [_entry(self.id, name, args)], "tool_calls" if complete else reason

    def first_delta(self) -> dict:
        delta = {"role": "assistant", "content": None}
        if self.named is not None:
            delta["tool_calls"] = [{"index": 0, **_entry(self.id, self.named, "")}]
        return delta

    def delta(self, piece: str, reason: str | None) -> tuple[dict, str | None]:
        """The delta for newly generated `piece` (and, at the end, the finish `reason`)."""
        self.text += piece
        if self.named is not None:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if piece else {}
            return delta, (None if reason is None else "tool_calls" if _complete(self.text) else reason)
        name, args, complete = self.call()
        if name is None:              # cut before the function's name: text, as `message`
            return ({} if reason is None else {"content": self.text}), reason
        delta = _tool_delta(self.streamed.deltas([_entry(self.id, name, args)]))
        return delta, (None if reason is None else "tool_calls" if complete else reason)


class AutoReply:
    """tool_choice "auto": the text is `{"tool_calls": [calls]}` or `{"response": text}`."""

    def __init__(self):
        self.text, self.sent, self.ids, self.streamed = "", 0, [], _Streamed()

    def _calls(self, body: str) -> list:
        """The calls (begun) of the array that `body` begins (after its `[`)."""
        calls, pos = [], 0
        while True:
            pos = _SEP.match(body, pos).end()
            if pos == len(body) or body[pos] == "]":
                return calls
            name, args, complete, length = _one_call(body[pos:])
            if name is None:
                return calls
            pos += length
            if len(self.ids) == len(calls):
                self.ids.append(_call_id())
            calls.append(_entry(self.ids[len(calls)], name, args))
            if not complete:
                return calls

    def message(self, text: str, reason: str) -> tuple[str | None, list | None, str]:
        """The whole reply, as `CallReply.message`; a text cut before its kind is known stays
        content as it is."""
        self.text = text
        if (m := _RESPONSE.match(text)) is not None:
            return string_prefix(text[m.end():])[0], None, reason
        if (m := _CALLS.match(text)) is not None:
            calls = self._calls(text[m.end():])
            if calls:
                return None, calls, "tool_calls" if _complete(text) else reason
        return text, None, reason

    def first_delta(self) -> dict:
        return {"role": "assistant", "content": None}

    def delta(self, piece: str, reason: str | None) -> tuple[dict, str | None]:
        """A text reply's new characters as they come; calls as `_Streamed` sends them."""
        self.text += piece
        if (m := _RESPONSE.match(self.text)) is not None:
            known = string_prefix(self.text[m.end():])[0]
            new, self.sent = known[self.sent:], len(known)
            return ({"content": new} if new else {}), reason
        if (m := _CALLS.match(self.text)) is not None:
            calls = self._calls(self.text[m.end():])
            if calls or reason is None:
                return _tool_delta(self.streamed.deltas(calls)), (
                    None if reason is None else "tool_calls" if _complete(self.text) else reason)
        if reason is None:
            return {}, None
        return {"content": self.text}, reason      # cut before its kind is known
