"""Tool calls on the chat API (flexkv/serve/tool_calls.py): `tool_choice` "auto" (the default
with tools), "required" and a named function.

- The reply's text -> OpenAI's message and stream deltas (hypothesis: any calls or text reply,
  any whitespace, cut anywhere, streamed in any pieces): a text reply streams exactly its
  characters; calls come back with their names and arguments, streamed from the moment a name
  is complete, put together (as the openai SDK does) the same; a cut reply never raises.
- The schema each mode generates under accepts what it should and nothing else.
- The prompt: "auto" states the tools and its format in a system message and shows earlier turns
  in it; a forced call keeps the template's tool rendering, with the instruction only where the
  template ignores the tools.
- Over HTTP (a tiny random llama with a 1K context, the byte tokenizer): every mode streamed and
  not, a conversation that goes on after a call, the `openai` client, and the 400s.
"""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv.serve.tool_calls import AutoReply, CallReply, string_prefix, tool_messages
from helpers import BYTE_VOCAB, byte_tokenizer, no_whitespace_bias, sse_events
from test_serve_json_schema import accepts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAME = "tiny-llama"
CTX = 1024
TOOLS = [{"type": "function", "function": {"name": "pick", "description": "pick x", "parameters": {
    "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}}},
         {"type": "function", "function": {"name": "no_args"}}]


def _chat_request(**fields):
    from flexkv.serve.protocol import ChatCompletionRequest

    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


# ----------------------------------------------------------------------------- replies
TEXTS = st.text(st.sampled_from('a"\\\n\x00é😀') | st.characters(codec="utf-8", exclude_categories=["Cs"]),
                max_size=12)      # escapes, a two-byte and a four-byte character (a surrogate pair) often
ARGS = st.dictionaries(st.sampled_from(["x", "y", "é"]), st.integers(-5, 5) | TEXTS, max_size=2)
CALLS = st.lists(st.tuples(st.sampled_from(["pick", "no_args", "a-b_1"]), ARGS), min_size=1, max_size=3)
SPACE = st.sampled_from(["", " ", "\n  "])


@st.composite
def auto_texts(draw):
    """(a generated "auto" reply's text, the response or the calls it holds)."""
    ws = lambda: draw(SPACE)  # noqa: E731
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        text = draw(TEXTS)
        body = json.dumps(text, ensure_ascii=ascii_only)
        return f'{ws()}{{{ws()}"response"{ws()}:{ws()}{body}{ws()}}}', text
    calls = draw(CALLS)
    parts = [f'{{{ws()}"name"{ws()}:{ws()}"{n}"{ws()},{ws()}"arguments"{ws()}:{ws()}'
             f'{json.dumps(a, ensure_ascii=ascii_only)}{ws()}}}' for n, a in calls]
    return f'{{{ws()}"tool_calls"{ws()}:{ws()}[{ws()}{(ws() + "," + ws()).join(parts)}{ws()}]{ws()}}}', calls


def _pieces(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_string_prefix_decodes_what_is_known(data):
    s, ascii_only = data.draw(TEXTS), data.draw(st.booleans())
    encoded = json.dumps(s, ensure_ascii=ascii_only)[1:]       # the body and its closing quote
    body = encoded + data.draw(st.sampled_from(["", "}", '"x']))
    k = data.draw(st.integers(0, len(body)))
    known, closed = string_prefix(body[:k])
    # every character whose whole escape is in body[:k], and no more
    ends = itertools.accumulate(len(json.dumps(ch, ensure_ascii=ascii_only)) - 2 for ch in s)
    assert known == s[:sum(end <= k for end in ends)] and closed == (k >= len(encoded))
    if k == len(body):
        assert (known, closed) == (s, True)


def assemble(deltas: list) -> list:
    """A stream's tool calls put together from its deltas, as the openai SDK does."""
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls") or ():
            call = calls.setdefault(tc["index"], {"function": {"arguments": ""}})
            call.update({k: v for k, v in tc.items() if k in ("id", "type")})
            if "name" in tc["function"]:
                call["function"]["name"] = tc["function"]["name"]
            call["function"]["arguments"] += tc["function"].get("arguments", "")
    return [{"id": c["id"], "type": c["type"], "function": {"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]}}
            for _, c in sorted(calls.items())]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_auto_reply_from_any_text_cut_anywhere(data):
    text, held = data.draw(auto_texts())
    reply = AutoReply()
    content, calls, reason = reply.message(text, "stop")
    if isinstance(held, str):
        assert (content, calls, reason) == (held, None, "stop")
    else:
        assert content is None and reason == "tool_calls"
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == held
        assert len({c["id"] for c in calls}) == len(calls) and all(c["id"].startswith("call_") for c in calls)
    # streamed in any pieces: a text reply's characters as they come; a call once its name is
    # complete, then its arguments as they grow; put together, the same reply
    stream, pieces = AutoReply(), _pieces(data.draw, text)
    deltas = [stream.delta(p, None) for p in pieces] + [stream.delta("", "stop")]
    assert all(r is None for _, r in deltas[:-1]) and deltas[-1][1] == reason
    if isinstance(held, str):
        assert "".join(d.get("content", "") for d, _ in deltas) == held
    else:
        assert all("content" not in d for d, _ in deltas)
        streamed = assemble([d for d, _ in deltas])
        assert [(c["type"], c["function"]) for c in streamed] == [(c["type"], c["function"]) for c in calls]
        assert [c["id"] for c in streamed] == [c["id"] for c in stream.message(text, "stop")[1]]
    # cut anywhere: never raises; a text reply's known characters, or the calls begun
    k = data.draw(st.integers(0, len(text) - 1))
    content, cut_calls, r = AutoReply().message(text[:k], "length")
    assert r == "length"
    if cut_calls is None:
        assert isinstance(held, str) and held.startswith(content) or content == text[:k]
    else:
        assert not isinstance(held, str) and len(cut_calls) <= len(held)
        for c, (name, args) in zip(cut_calls, held):
            assert c["function"]["name"] == name


def test_call_reply_from_whole_cut_and_streamed_texts():
    def call(reply, name, args):
        return [{"id": reply.id, "type": "function", "function": {"name": name, "arguments": args}}]
    r = CallReply(None)             # "required": the text names the function
    assert r.message(' {"name": "pick", "arguments": {"x": 1} }\n', "stop") == (
        None, call(r, "pick", '{"x": 1}'), "tool_calls")
    assert r.message('{"name":"pick","arguments":{"x"', "length") == (None, call(r, "pick", '{"x"'), "length")
    assert r.message('{"name":"pick","arguments":{"x":1}', "length") == (None, call(r, "pick", '{"x":1}'), "length")
    assert r.message('{"name": "pi', "length") == ('{"name": "pi', None, "length")   # cut before the name
    n = CallReply("pick")
    assert n.message(' {"x": 2} ', "stop") == (None, call(n, "pick", '{"x": 2}'), "tool_calls")
    assert n.message('{"x": ', "length") == (None, call(n, "pick", '{"x":'), "length")
    s = CallReply("pick")           # streamed: the header first, then the arguments as they come
    assert s.first_delta()["tool_calls"][0]["function"] == {"name": "pick", "arguments": ""}
    assert s.delta('{"x"', None) == ({"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}, None)
    assert s.delta(":1}", "stop")[1] == "tool_calls"
    q = CallReply(None)             # streamed "required": the call once its name is complete
    assert q.first_delta() == {"role": "assistant", "content": None}
    assert q.delta('{"name":"pick",', None) == ({}, None)
    assert q.delta('"arguments":', None) == ({"tool_calls": [{"index": 0, **call(q, "pick", "")[0]}]}, None)
    assert q.delta('{"x"', None) == ({"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}, None)
    assert q.delta(':2}}', "stop") == ({"tool_calls": [{"index": 0, "function": {"arguments": ':2}'}}]},
                                       "tool_calls")


def test_auto_calls_stream_as_their_arguments_grow():
    """Byte by byte: each call goes out once its name is complete, its arguments as they grow
    (a number's digits as they come), the next call after it; never text."""
    text = '{"tool_calls": [{"name": "pick", "arguments": {"x": 12}}, {"name": "no_args", "arguments": {}}]}'
    reply, seen = AutoReply(), []
    for i, ch in enumerate(text):
        delta, reason = reply.delta(ch, "stop" if i == len(text) - 1 else None)
        seen.append((text[:i + 1], delta))
    starts = [prefix for prefix, d in seen if any("id" in c for c in d.get("tool_calls", ()))]
    assert [p[-11:] for p in starts] == ['arguments":', 'arguments":']
    args = [(p, c["function"]["arguments"]) for p, d in seen for c in d.get("tool_calls", ())
            if c["index"] == 0 and "id" not in c]
    pieces = [a for _, a in args]        # (whitespace waits for what follows it)
    assert "".join(pieces) == '{"x": 12}' and len(pieces) == 8 and reason == "tool_calls"
    assert all("content" not in d for _, d in seen)


# ----------------------------------------------------------------------------- schemas
def test_each_mode_generates_under_its_schema():
    auto = _chat_request(tools=TOOLS).call_schema()
    assert accepts(auto, b'{"response": "anything \\u00e9"}')
    assert accepts(auto, b'{"tool_calls": [{"name": "pick", "arguments": {"x": 2}}, '
                         b'{"name": "no_args", "arguments": {}}]}')
    for bad in (b'{"tool_calls": []}', b'{"tool_calls": [{"name": "nope", "arguments": {}}]}',
                b'{"tool_calls": [{"name": "pick", "arguments": {"x": 3}}]}',
                b'{"response": "a", "tool_calls": []}', b'{"response": 1}', b'"text"'):
        assert not accepts(auto, bad), bad
    one = _chat_request(tools=TOOLS, parallel_tool_calls=False).call_schema()
    assert accepts(one, b'{"tool_calls": [{"name": "no_args", "arguments": {}}]}')
    assert not accepts(one, b'{"tool_calls": [{"name": "no_args", "arguments": {}}, '
                            b'{"name": "no_args", "arguments": {}}]}')
    required = _chat_request(tools=TOOLS, tool_choice="required").call_schema()
    assert accepts(required, b'{"name": "pick", "arguments": {"x": 1}}')
    assert not accepts(required, b'{"response": "a"}')
    named = _chat_request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "pick"}})
    assert accepts(named.call_schema(), b'{"x": 1}') and not accepts(named.call_schema(), b'{}')
    assert [_chat_request(**f).tool_mode() for f in (
        {}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"},
        {"tools": TOOLS, "tool_choice": "required"})] == [None, "auto", None, "required"]
    assert named.tool_mode() == "named" and named.named_tool() == "pick"


# ----------------------------------------------------------------------------- the prompt
def _render(with_tools: bool):
    """A chat template as a function: lines of role: content, the tools first where it renders
    them."""
    def render(msgs, tools=None):
        head = f"TOOLS {json.dumps(tools)}\n" if with_tools and tools else ""
        return head + "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
    return render


def test_the_prompt_offers_the_tools_once():
    user = {"role": "user", "content": "hi"}
    system = {"role": "system", "content": "Be brief."}
    # a forced call: the template's rendering where it has one, else the instruction
    for mode, named in (("required", None), ("named", "pick")):
        assert tool_messages(_render(True), [user], TOOLS, mode, named) == f"TOOLS {json.dumps(TOOLS)}\nuser: hi\n"
        text = tool_messages(_render(False), [system, user], TOOLS, mode, named)
        assert text.startswith("system: Be brief.\n\nYou can call these functions")
        assert json.dumps([t["function"] for t in TOOLS]) in text and text.endswith("user: hi\n")
        assert ("of a call of pick" in text) == (mode == "named")
    # auto: the instruction (never the template's tools), earlier turns in its format
    call = {"id": "call_1", "type": "function", "function": {"name": "pick", "arguments": {"x": 1}}}
    msgs = [user, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "1", "tool_call_id": "call_1"},
            {"role": "assistant", "content": 'say "ok"'}, user]
    text = tool_messages(_render(True), msgs, TOOLS, "auto")
    lines = text.split("\n")
    assert lines[0].startswith("system: You can call these functions") and "TOOLS" not in text
    assert '{"tool_calls": [' in lines[2] and '{"response": <your reply>}' in lines[2]
    assert lines[3:] == ["user: hi", 'assistant: {"tool_calls": [{"name": "pick", "arguments": {"x": 1}}]}',
                         "tool: 1", 'assistant: {"response": "say \\"ok\\""}', "user: hi", ""]
    # no tools in use: the template as it is
    assert tool_messages(_render(True), [user], TOOLS, None) == f"TOOLS {json.dumps(TOOLS)}\nuser: hi\n"
    assert tool_messages(_render(True), [user], [], None) == "user: hi\n"


# ----------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import flexkv
    from flexkv.serve import Engine
    from flexkv.serve.api import build_app
    from flexkv.serve.server import BackgroundServer
    from helpers import make_checkpoint

    tok = byte_tokenizer()
    d = make_checkpoint(tmp_path_factory.mktemp("tiny-tools-llama"), "llama", seed=0,
                        vocab_size=BYTE_VOCAB, max_position_embeddings=CTX,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(d))
    model, tok = flexkv.load_model(d)
    engine = Engine(model, tok, policy="h2o", budget=64, max_slots=2, max_new_tokens=160,
                    max_waiting=8, compile=False)
    with BackgroundServer(build_app(engine, NAME)) as srv:
        srv.tok = tok
        yield srv


def _bias(tok, **chars) -> dict:
    out = no_whitespace_bias(tok)
    for ch, v in chars.items():
        (i,) = tok(ch, add_special_tokens=False)["input_ids"]
        out[str(i)] = v
    return out


def _post(c, body: dict) -> tuple[dict, str]:
    """(the message, the finish reason) of a one-choice reply, streamed or not (the stream's
    deltas put together as the openai SDK does)."""
    if not body.get("stream"):
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        (ch,) = r.json()["choices"]
        return ch["message"], ch["finish_reason"]
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    msg, calls, reason = {"role": "assistant", "content": None}, {}, None
    for e in events[:-1]:
        (ch,) = e["choices"]
        d = ch["delta"]
        assert d or ch["finish_reason"], e              # no event that says nothing
        if d.get("content"):
            msg["content"] = (msg["content"] or "") + d["content"]
        for tc in d.get("tool_calls") or ():
            entry = calls.setdefault(tc["index"], {"function": {"arguments": ""}})
            entry.update({k: v for k, v in tc.items() if k in ("id", "type")})
            entry["function"]["name"] = tc["function"].get("name", entry["function"].get("name"))
            entry["function"]["arguments"] += tc["function"].get("arguments", "")
        reason = ch["finish_reason"] or reason
    msg["tool_calls"] = [calls[i] for i in sorted(calls)] or None
    return msg, reason


def _check_calls(calls: list, names=("pick", "no_args")) -> None:
    assert calls and len({c["id"] for c in calls}) == len(calls)
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        name, args = c["function"]["name"], json.loads(c["function"]["arguments"])
        assert name in names
        assert args in ({"x": 1}, {"x": 2}) if name == "pick" else args == {}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_forced_tool_calls(server, stream):
    """A named function and "required": the reply is one call (content null, finish_reason
    "tool_calls"), its arguments JSON of the function's parameters. The call and the tool's
    answer then go back in as messages."""
    httpx = pytest.importorskip("httpx")
    user = {"role": "user", "content": "pick one"}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for choice in ({"type": "function", "function": {"name": "pick"}}, "required"):
            msg, reason = _post(c, {"messages": [user], "tools": TOOLS, "tool_choice": choice,
                                    "max_tokens": 80, "temperature": 0, "stream": stream,
                                    "logit_bias": no_whitespace_bias(server.tok)})
            assert reason == "tool_calls" and msg["content"] is None and len(msg["tool_calls"]) == 1
            _check_calls(msg["tool_calls"], ("pick",) if choice != "required" else ("pick", "no_args"))
        msgs = [user, {"role": "assistant", "content": None, "tool_calls": msg["tool_calls"]},
                {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "picked"}]
        for choice in ("none", "auto", "required"):
            msg, reason = _post(c, {"messages": msgs, "tools": TOOLS, "tool_choice": choice,
                                    "max_tokens": 4, "stream": stream, "temperature": 0,
                                    "ignore_eos": True})
            assert reason == "length" and msg["tool_calls"] is None      # the prompt rendered


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_auto_tool_choice(server, stream):
    """tool_choice "auto" (the default with tools): the model calls tools, or answers in text.
    Biasing the first letter after '{"' steers which: "t" (tool_calls) gives calls, "r"
    (response) a text reply, which streams as text."""
    httpx = pytest.importorskip("httpx")
    tok = server.tok
    body = {"messages": [{"role": "user", "content": "pick one"}], "tools": TOOLS,
            "max_tokens": 150, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        msg, reason = _post(c, body | {"logit_bias": _bias(tok, t=30), "parallel_tool_calls": False})
        assert reason == "tool_calls" and msg["content"] is None and len(msg["tool_calls"]) == 1
        _check_calls(msg["tool_calls"])
        msg, reason = _post(c, body | {"logit_bias": _bias(tok, t=30)})
        if reason == "tool_calls":                        # several calls may not fit 150 tokens
            _check_calls(msg["tool_calls"])
        msg, reason = _post(c, body | {"logit_bias": _bias(tok, r=30, **{'"': 60})})
        assert (msg, reason) == ({"role": "assistant", "content": "", "tool_calls": None}
                                 if not stream else {"role": "assistant", "content": None,
                                                     "tool_calls": None}, "stop")
        msg, reason = _post(c, body | {"logit_bias": _bias(tok, r=30, x=50), "max_tokens": 20})
        assert (msg["content"], reason, msg["tool_calls"]) == ("x" * (20 - len('{"response":"')),
                                                               "length", None)


def test_tokenize_counts_the_tools_prompt(server):
    """`/tokenize` of messages with tools gives the prompt the chat request runs on: the tools'
    instruction included, per tool_choice."""
    httpx = pytest.importorskip("httpx")
    msgs = [{"role": "user", "content": "pick one"}]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        counts = set()
        for choice in ("auto", "required", {"type": "function", "function": {"name": "pick"}}, "none"):
            fields = {"messages": msgs, "tools": TOOLS, "tool_choice": choice}
            tokens = c.post("/tokenize", json=fields).json()["tokens"]
            r = c.post("/v1/chat/completions", json=fields | {"max_tokens": 1})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tokens), r.text
            counts.add(len(tokens))
        assert len(counts) == 4                  # each choice's own prompt ("none": no instruction)


def test_the_openai_client_calls_tools(server):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "pick one"}]
    bias = _bias(server.tok, t=30)
    named = oc.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "pick"}},
                                       temperature=0, logit_bias=bias).choices[0]
    auto = oc.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=150,
                                      parallel_tool_calls=False, temperature=0,
                                      logit_bias=bias).choices[0]
    for ch in (named, auto):
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        _check_calls([c.model_dump() for c in ch.message.tool_calls],
                     ("pick",) if ch is named else ("pick", "no_args"))
    # streamed: the SDK's chunk types parse every delta, and the calls put together are whole
    chunks = list(oc.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=150,
                                             parallel_tool_calls=False, temperature=0,
                                             logit_bias=bias, stream=True))
    deltas = [c.choices[0].delta.model_dump(exclude_none=True) for c in chunks if c.choices]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    _check_calls(assemble(deltas))


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "required"}, "a tool_choice other than 'none' needs tools"),
    ({"tool_choice": "auto"}, "a tool_choice other than 'none' needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice names 'nope', which is not among the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tools beside a response_format"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools beside a response_format"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "each function needs a name of its own"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "(?=x)"}}}]},
     "function 'f': parameters: json_schema at /pattern"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, "name"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "a tool message needs tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "a user message needs content"),
])
def test_tool_errors_name_what_is_wrong(server, body, message):
    httpx = pytest.importorskip("httpx")
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}]} | body)
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert message in e["message"], e
    assert httpx.get(f"{server.url}/health").status_code == 200
