"""The OpenAI-compatible server (`flexkv serve`, flexkv/serve/api.py) over the real Engine.

A tiny random llama (tests/helpers.py, 256-token context) with a byte-level tokenizer built in
code (`helpers.byte_tokenizer`: one token per byte, a chat template) is served by uvicorn in a
background thread on a free loopback port; the tests talk to it over real HTTP with httpx (sync
and async) and the `openai` client (when installed). Engines: `main` (4 slots) for the API
tests, `fuzz` (at most 4 new tokens) for schemathesis, `aux` (1 slot, 200 new tokens) for the
disconnect tests, `held` (an engine the test itself starts) for the queue-full test, and apps
of their own for the API key and the body limit. Tool calls: tests/test_serve_tools.py.
"""
from __future__ import annotations

import asyncio
import json
import typing
import re
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


from flexkv.serve import Engine  # noqa: E402
from helpers import BYTE_VOCAB, byte_tokenizer, no_whitespace_bias, sse_events  # noqa: E402
from flexkv.serve.api import build_app  # noqa: E402
from flexkv.serve.server import BackgroundServer  # noqa: E402
from flexkv.serve.detokenize import IncrementalText  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the engine thread, uvicorn and the clients share 2 cores

NAME = "tiny-llama"
VOCAB = BYTE_VOCAB
CTX = 256
MAIN_MAX_NEW = 16
AUX_MAX_NEW = 200


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory):
    from helpers import make_checkpoint

    tok = byte_tokenizer()
    d = make_checkpoint(tmp_path_factory.mktemp("tiny-chat-llama"), "llama", seed=0,
                        vocab_size=VOCAB, max_position_embeddings=CTX,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model_tok(tiny_chat_dir):
    import flexkv

    model, tok = flexkv.load_model(tiny_chat_dir)
    assert tok is not None and tok.chat_template
    return model, tok


@pytest.fixture(scope="module")
def main(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=4, max_new_tokens=MAIN_MAX_NEW,
                    max_waiting=32, compile=False)
    with BackgroundServer(build_app(engine, NAME)) as srv:
        srv.engine = engine
        yield srv


def _recording(engine) -> list:
    """Make `engine.submit` and `engine.submit_many` record every handle they hand out; returns
    the list."""
    handles, submit, submit_many = [], engine.submit, engine.submit_many

    def recording_submit(*a, **k):
        h = submit(*a, **k)
        handles.append(h)
        return h

    def recording_submit_many(*a, **k):
        hs = submit_many(*a, **k)
        handles.extend(hs)
        return hs

    engine.submit, engine.submit_many = recording_submit, recording_submit_many
    return handles


@pytest.fixture(scope="module")
def aux(model_tok):
    """1 slot and up to 200 new tokens, for the disconnect tests; records its handles."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=AUX_MAX_NEW,
                    max_waiting=4, compile=False)
    handles = _recording(engine)
    with BackgroundServer(build_app(engine, NAME)) as srv:
        srv.engine, srv.handles = engine, handles
        yield srv


@pytest.fixture
def held(model_tok):
    """1 slot, 2 waiting places, and an app that does not start its engine (the test does), so
    requests can be made to wait deterministically."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=8,
                    max_waiting=2, compile=False)
    with BackgroundServer(build_app(engine, NAME, start_engine=False)) as srv:
        srv.engine = engine
        try:
            yield srv
        finally:
            engine.shutdown()


@pytest.fixture(scope="module")
def client(main):
    with httpx.Client(base_url=main.url, timeout=60) as c:
        yield c


# ----------------------------------------------------------------------------- helpers
def _collect(events, chat: bool):
    """Stream events -> (text, finish_reason, usage or None); checks the OpenAI chunk shapes."""
    assert events and events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert all(isinstance(c, dict) and "error" not in c for c in chunks), chunks
    usage = None
    if chunks and chunks[-1]["choices"] == [] and chunks[-1].get("usage"):
        usage = chunks.pop()["usage"]
    obj = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == obj and c["model"] == NAME for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert all(r is None for r in reasons[:-1]) and reasons[-1] in ("stop", "length")
    return text, reasons[-1], usage


def _ask(client, body: dict, chat: bool = False):
    """One request (streamed or not, per body) -> (text, finish_reason, usage or None)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if body.get("stream"):
        with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            return _collect(sse_events(r), chat)
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == ("chat.completion" if chat else "text_completion") and d["model"] == NAME
    c = d["choices"][0]
    text = c["message"]["content"] if chat else c["text"]
    if chat:
        assert c["message"]["role"] == "assistant"
    return text, c["finish_reason"], d["usage"]


async def _ask_async(client, body: dict, chat: bool = False):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = []
            async for line in r.aiter_lines():
                if line:
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
            return _collect(events, chat)[:2]
    r = await client.post(path, json=body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return (c["message"]["content"] if chat else c["text"]), c["finish_reason"]


def _reference(model, ids, n, budget=32):
    """flexkv.generate's greedy tokens (no eos stop) for one prompt."""
    import torch

    import flexkv

    out = flexkv.generate(model, torch.tensor([ids]), max_new_tokens=n, policy="h2o", budget=budget)
    return out.tokens[0, len(ids):].tolist()


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _metrics(client, buckets: dict | None = None) -> dict:
    """/metrics -> {sample name: value}; a histogram's bucket lines go to `buckets` (name ->
    [(le, count)] in order), if given."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            m = re.fullmatch(r'([a-z0-9_]+)\{model="[^"]*"(?:,le="([^"]+)")?\} (\S+)', line)
            assert m, line
            name, le, value = m.groups()
            if le is None:
                out[name] = float(value)
            elif buckets is not None:
                buckets.setdefault(name, []).append((float(le), float(value)))
    return out


def _wait_until(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- detokenization
def test_incremental_text_holds_partial_characters_and_stop_prefixes():
    tok = byte_tokenizer()
    text = "héllo wörld ✓ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())                      # one token per byte

    inc = IncrementalText(tok)
    pieces = [inc.add(i) for i in ids]
    assert "".join(pieces) + inc.finish() == text
    assert not any("\ufffd" in p for p in pieces)              # split characters are held back

    inc = IncrementalText(tok, stop=["wö", "never"])
    pieces = []
    for i in ids:
        pieces.append(inc.add(i))
        if inc.stopped:
            break
    assert inc.stopped and inc.text == "héllo " and "".join(pieces) + inc.finish() == "héllo "
    assert inc.n_tokens == len("héllo wö".encode())
    assert inc.add(ids[0]) == ""                               # nothing after a stop

    inc = IncrementalText(tok, stop=["lo wx"])                 # a prefix that does not complete
    out = "".join(inc.add(i) for i in ids)
    assert not inc.stopped and out + inc.finish() == text
    inc = IncrementalText(tok, stop=["\u2713"])                # a stop made of a multi-byte char
    pieces = []
    for i in ids:
        pieces.append(inc.add(i))
        if inc.stopped:
            break
    assert "".join(pieces) + inc.finish() == "héllo wörld "


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: '▁' marks a space, dropped at the start of a
    decode), as LLaMA-2 and Mistral use: decoding a token alone differs from decoding it after
    others, which is what incremental detokenization must get right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "▁Hello", "▁world", "Hello", ",", "!", "▁", "▁the", "é", "▁ll",
             "ama", "s", "\n"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>"), len(words)


def _default_tokenizer_or_none():
    from flexkv.models.provision import DEFAULT_MODEL, cache_root, is_complete

    d = cache_root() / DEFAULT_MODEL
    if not is_complete(d):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def test_token_pieces_byte_table_is_gpt2s():
    """TokenPieces' byte-level alphabet is GPT-2's (transformers keeps it in one of two places,
    by version), and a byte-level token's bytes are its exact bytes even mid-character."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    from flexkv.serve.detokenize import TokenPieces, _byte_level_decoder

    assert _byte_level_decoder() == {c: b for b, c in bytes_to_unicode().items()}
    tok = byte_tokenizer()
    pieces = TokenPieces(tok)
    for text in ("é", "🙂", " a"):
        for t in tok(text)["input_ids"]:
            b = pieces.bytes(t)
            assert b is not None and len(b) == 1     # one byte per token in this tokenizer
        assert [pieces.bytes(t)[0] for t in tok(text)["input_ids"]] == list(text.encode())


def test_incremental_text_equals_one_decode_of_everything():
    """For random id sequences, the released pieces + finish() == one decode of all ids (byte
    tokens with broken UTF-8, SentencePiece-style spaces, and the default model's BPE when it is
    provisioned); with a stop string, the text is that decode cut before its first occurrence."""
    import random

    rng = random.Random(0)
    cases = [(byte_tokenizer(), VOCAB), _metaspace_tokenizer()]
    smol = _default_tokenizer_or_none()
    if smol is not None:
        cases.append((smol, len(smol)))
    for tok, vocab in cases:
        for _ in range(60):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
            whole = _decode(tok, ids)
            inc = IncrementalText(tok)
            assert "".join(inc.add(i) for i in ids) + inc.finish() == whole, (ids, whole)
            if len(whole) >= 4 and "\ufffd" not in whole:
                stop = whole[rng.randrange(1, len(whole) - 2):][:2]
                inc = IncrementalText(tok, stop=[stop])
                out = ""
                for i in ids:
                    out += inc.add(i)
                    if inc.stopped:
                        break
                assert out + inc.finish() == whole[:whole.find(stop)] and inc.stopped, (ids, stop)


# ----------------------------------------------------------------------------- basic endpoints
def test_models_health_metrics(client, main):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    d = client.get("/v1/models").json()
    assert d["object"] == "list" and [m["id"] for m in d["data"]] == [NAME]
    assert d["data"][0]["object"] == "model" and d["data"][0]["max_model_len"] == CTX
    assert client.get(f"/v1/models/{NAME}").json()["id"] == NAME
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    m = _metrics(client)
    for name in ("flexkv_requests_running", "flexkv_requests_waiting", "flexkv_slots_total",
                 "flexkv_slots_used", "flexkv_slot_occupancy", "flexkv_generation_tokens_total",
                 "flexkv_prompt_tokens_total", "flexkv_kv_bytes_held", "flexkv_kv_bytes_allocated"):
        assert name in m, name
    assert m["flexkv_slots_total"] == 4
    text = client.get("/metrics").text
    assert "# TYPE flexkv_generation_tokens_total counter" in text
    assert "# TYPE flexkv_kv_bytes_held gauge" in text
    assert "# TYPE flexkv_prefill_seconds_total counter" in text


def test_latency_histograms(client, main):
    """Prometheus histograms of time to first token, time per output token and end-to-end
    latency: cumulative buckets ending at +Inf = count, one observation per request that
    finished normally, sums that match what the client saw."""
    names = ("flexkv_time_to_first_token_seconds", "flexkv_time_per_output_token_seconds",
             "flexkv_e2e_request_latency_seconds")
    text = client.get("/metrics").text
    for n in names:
        assert f"# TYPE {n} histogram" in text
    before = _metrics(client)
    t0 = time.perf_counter()
    _ask(client, {"prompt": "time me", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    wall = time.perf_counter() - t0
    buckets = {}
    after = _metrics(client, buckets)
    for n in names:
        b = buckets[f"{n}_bucket"]
        les, counts = [le for le, _ in b], [c for _, c in b]
        assert les == sorted(les) and les[-1] == float("inf")
        assert counts == sorted(counts) and counts[-1] == after[f"{n}_count"]
        assert after[f"{n}_count"] == before[f"{n}_count"] + 1
    e2e = after["flexkv_e2e_request_latency_seconds_sum"] - before["flexkv_e2e_request_latency_seconds_sum"]
    ttft = after["flexkv_time_to_first_token_seconds_sum"] - before["flexkv_time_to_first_token_seconds_sum"]
    tpot = (after["flexkv_time_per_output_token_seconds_sum"]
            - before["flexkv_time_per_output_token_seconds_sum"])
    assert 0 < ttft < e2e <= wall and e2e == pytest.approx(ttft + 7 * tpot, rel=1e-6)


def test_completion_equals_generate(client, main, model_tok):
    model, tok = model_tok
    prompt = "The llama said"
    ids = tok(prompt)["input_ids"]
    m0 = _metrics(client)
    before = m0["flexkv_generation_tokens_total"]
    text, reason, usage = _ask(client, {"model": NAME, "prompt": prompt, "max_tokens": 12,
                                        "temperature": 0, "ignore_eos": True})
    m1 = _metrics(client)
    for name in ("flexkv_prefill_seconds_total", "flexkv_decode_seconds_total"):
        assert m1[name] > m0[name], name   # the request's prefill and decode steps were timed
    assert text == _decode(tok, _reference(model, ids, 12))
    assert reason == "length"
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}
    assert _metrics(client)["flexkv_generation_tokens_total"] >= before + 12
    # token ids as the prompt: the same answer
    text2, _, usage2 = _ask(client, {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                     "ignore_eos": True})
    assert text2 == text and usage2 == usage


def test_stop_token_ids_end_the_text(client, model_tok):
    model, tok = model_tok
    ids = tok("Stop at a token:")["input_ids"]
    ref = _reference(model, ids, MAIN_MAX_NEW)
    stop = ref[4]
    cut = ref.index(stop)
    for stream in (False, True):
        text, reason, usage = _ask(client, {"prompt": ids, "max_tokens": MAIN_MAX_NEW, "temperature": 0,
                                            "ignore_eos": True, "stop_token_ids": [stop], "stream": stream})
        assert (text, reason) == (_decode(tok, ref[:cut]), "stop")
    assert usage is None or usage["completion_tokens"] == cut


def test_eos_stops_with_finish_reason_stop(client, model_tok):
    """Without ignore_eos the engine stops at the tokenizer's eos ("</s>"): find a prompt whose
    greedy answer contains it, and check the text ends right before it."""
    model, tok = model_tok
    eos = tok.eos_token_id
    for k in range(40):
        ids = tok(f"prompt number {k}:")["input_ids"]
        ref = _reference(model, ids, MAIN_MAX_NEW)
        if eos in ref:
            break
    else:
        pytest.skip("no greedy answer reaches eos on this random model")
    cut = ref.index(eos)
    text, reason, usage = _ask(client, {"prompt": ids, "max_tokens": MAIN_MAX_NEW, "temperature": 0})
    assert reason == "stop" and text == _decode(tok, ref[:cut])
    assert usage["completion_tokens"] == cut


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_stream_equals_non_stream(client, model_tok, chat):
    model, tok = model_tok
    body = {"model": NAME, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Tell me about llamas."}]
        ids = tok(tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
    else:
        body["prompt"] = "Tell me about llamas."
        ids = tok(body["prompt"])["input_ids"]
    want = _decode(tok, _reference(model, ids, 16))
    text, reason, usage = _ask(client, body, chat)
    assert (text, reason) == (want, "length")
    assert usage["prompt_tokens"] == len(ids)
    stext, sreason, susage = _ask(client, {**body, "stream": True,
                                           "stream_options": {"include_usage": True}}, chat)
    assert (stext, sreason, susage) == (want, "length", usage)
    stext, sreason, susage = _ask(client, {**body, "stream": True}, chat)
    assert (stext, sreason, susage) == (want, "length", None)


def test_chat_content_parts_and_developer_role(client):
    a = _ask(client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                      "temperature": 0, "ignore_eos": True}, chat=True)
    b = _ask(client, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "max_completion_tokens": 6, "temperature": 0, "ignore_eos": True}, chat=True)
    assert a == b
    d = _ask(client, {"messages": [{"role": "developer", "content": "x"},
                                   {"role": "user", "content": "hi"}], "max_tokens": 6,
                      "temperature": 0, "ignore_eos": True}, chat=True)
    s = _ask(client, {"messages": [{"role": "system", "content": "x"},
                                   {"role": "user", "content": "hi"}], "max_tokens": 6,
                      "temperature": 0, "ignore_eos": True}, chat=True)
    assert d == s


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_stop_strings_cut_the_text(client, model_tok, stream):
    model, tok = model_tok
    prompt = "Stop here:"
    full = _decode(tok, _reference(model, tok(prompt)["input_ids"], MAIN_MAX_NEW))
    # a 2-character stop string that occurs after the start, made of whole characters
    k = next((i for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2]
              and full[i:i + 2].strip()), None)
    if k is None:
        pytest.skip(f"no usable stop string in {full!r}")
    stop = full[k:k + 2]
    want = full[:full.find(stop)]
    body = {"prompt": prompt, "max_tokens": MAIN_MAX_NEW, "temperature": 0, "ignore_eos": True,
            "stop": ["\x00never", stop], "stream": stream}
    text, reason, usage = _ask(client, body)
    assert (text, reason) == (want, "stop")
    if usage is not None:
        assert usage["completion_tokens"] < MAIN_MAX_NEW
    # a stop string that never occurs: the full text, finish_reason "length"
    text, reason, _ = _ask(client, {**body, "stop": "\x01\x02"})
    assert (text, reason) == (full, "length")


def test_seeded_sampling_is_reproducible(client):
    body = {"prompt": "Once upon", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9,
            "top_k": 50, "seed": 1234, "ignore_eos": True}
    a = _ask(client, body)
    assert a == _ask(client, body)
    assert _ask(client, {**body, "stream": True})[:2] == a[:2]
    assert a[2]["completion_tokens"] == 12


def _batch_choices(client, body: dict) -> tuple[list, dict | None]:
    """A batched completions request -> ([(text, finish_reason)] by choice index, usage);
    checks the streamed events' shapes (one finish event per choice, its last)."""
    if not body.get("stream"):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        d = r.json()
        assert [c["index"] for c in d["choices"]] == list(range(len(d["choices"])))
        return [(c["text"], c["finish_reason"]) for c in d["choices"]], d["usage"]
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks, usage = events[:-1], None
    if body.get("stream_options", {}).get("include_usage"):
        last = chunks.pop()
        assert last["choices"] == [] and last["usage"]
        usage = last["usage"]
    assert len({c["id"] for c in chunks}) == 1
    texts, reasons = {}, {}
    for c in chunks:
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        i = ch["index"]
        assert i not in reasons, "an event after its choice's finish event"
        texts[i] = texts.get(i, "") + ch["text"]
        if ch["finish_reason"] is not None:
            reasons[i] = ch["finish_reason"]
    assert sorted(texts) == sorted(reasons) == list(range(len(texts)))
    return [(texts[i], reasons[i]) for i in range(len(texts))], usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_batched_prompts_equal_their_single_answers(client, main, model_tok, stream):
    """A list of prompts (strings, or token-id lists) is one choice per prompt, in order, each
    equal to that prompt's own answer; usage sums the prompts'; the slots free afterwards."""
    model, tok = model_tok
    prompts = ["The llama said", "Once upon a time, in a land", "A", "Tell me about llamas."]
    ids = [tok(p)["input_ids"] for p in prompts]
    want = [(_decode(tok, _reference(model, x, 12)), "length") for x in ids]
    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    for prompt in (prompts, ids):
        got, usage = _batch_choices(client, {**body, "prompt": prompt})
        assert got == want
        assert usage == {"prompt_tokens": sum(map(len, ids)), "completion_tokens": 12 * 4,
                         "total_tokens": sum(map(len, ids)) + 48}
    # stop strings apply to each choice; a one-item batch is a batch too
    stop = next(want[0][0][k:k + 2] for k in range(2, len(want[0][0]) - 1)
                if "\ufffd" not in want[0][0][k:k + 2] and want[0][0][k:k + 2].strip())
    got, _ = _batch_choices(client, {**body, "prompt": prompts[:2], "stop": stop})
    assert got == [(t[:t.find(stop)], "stop") if stop in t else (t, r) for t, r in want[:2]], stop
    assert _batch_choices(client, {**body, "prompt": [ids[2]]})[0] == [want[2]]
    m = _metrics(client)
    assert m["flexkv_slots_used"] == 0 and m["flexkv_requests_waiting"] == 0


def _chat_choices(client, body: dict) -> list:
    """A chat request with n choices -> [(text, finish_reason)] by index (streamed: each choice
    opens with its role event and ends with one finish event)."""
    if not body.get("stream"):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"]
        assert [c["index"] for c in ch] == list(range(len(ch)))
        return [(c["message"]["content"], c["finish_reason"]) for c in ch]
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts, reasons = {}, {}
    for c in events[:-1]:
        ch = c["choices"][0]
        i = ch["index"]
        if i not in texts:
            assert ch["delta"] == {"role": "assistant", "content": ""}
            texts[i] = ""
            continue
        assert i not in reasons
        texts[i] += ch["delta"].get("content", "")
        if ch["finish_reason"] is not None:
            reasons[i] = ch["finish_reason"]
    assert sorted(texts) == sorted(reasons) == list(range(len(texts)))
    return [(texts[i], reasons[i]) for i in range(len(texts))]


def test_min_tokens_defers_stop_strings():
    """A stop string counts only where it ends after the text of the first `min_tokens` tokens
    (vLLM's rule): one that ends at or before it is passed over, one that spans it counts."""
    tok = byte_tokenizer()
    ids = tok("xab ab!", add_special_tokens=False)["input_ids"]      # one token per byte

    def run(m):
        inc = IncrementalText(tok, stop=["ab"], min_tokens=m)
        out = ""
        for i in ids:
            out += inc.add(i)
            if inc.stopped:
                break
        return out + inc.finish(), inc.stopped
    assert run(0) == run(2) == ("x", True)       # "ab" ends at character 3 > 2
    assert run(3) == ("xab ", True)              # the first "ab" ends with token 3: passed over
    assert run(7) == ("xab ab!", False)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_penalties_logit_bias_and_min_tokens(client, main, model_tok, stream):
    """presence / frequency / repetition penalties, logit_bias and min_tokens reach the engine
    as `SamplingParams` (each choice's text equals the engine's own answer with them, run
    directly); a +100 bias makes the answer that token; min_tokens defers a stop token id."""
    from flexkv.serve import SamplingParams

    model, tok = model_tok
    direct = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=MAIN_MAX_NEW,
                    compile=False)
    ids = tok("Penalise me:")["input_ids"]
    ref = _reference(model, ids, MAIN_MAX_NEW)
    stop = ref[3]
    cut = ref.index(stop)
    body = {"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": stream,
            "presence_penalty": 0.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3,
            "logit_bias": {str(ref[0]): -100, "65": 2.5}}
    want = direct.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=0.5,
                                                  frequency_penalty=1.0, repetition_penalty=1.3,
                                                  logit_bias={ref[0]: -100, 65: 2.5}))[0]
    assert want != ref[:12] and want[0] != ref[0]
    assert _ask(client, body)[:2] == (_decode(tok, want), "length")
    (b,) = tok("B", add_special_tokens=False)["input_ids"]
    text, reason, _ = _ask(client, {"prompt": ids, "max_tokens": 5, "temperature": 0, "stream": stream,
                                    "logit_bias": {str(b): 100}})
    assert (text, reason) == ("B" * 5, "length")
    deferred = {"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": stream, "stop_token_ids": [stop]}
    assert _ask(client, deferred)[:2] == (_decode(tok, ref[:cut]), "stop")
    want = direct.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop,),
                                                  min_tokens=cut + 1))[0]
    assert len(want) > cut
    assert _ask(client, {**deferred, "min_tokens": cut + 1})[0] == _decode(tok, want)
    msgs = [{"role": "user", "content": "hi"}]
    chat_ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    want = direct.generate([chat_ids], SamplingParams(max_tokens=6, ignore_eos=True,
                                                       frequency_penalty=-2.0))[0]
    got = _ask(client, {"messages": msgs, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "frequency_penalty": -2.0, "stream": stream}, chat=True)
    assert got[:2] == (_decode(tok, want), "length")
    m = _metrics(client)
    assert m["flexkv_slots_used"] == 0 and m["flexkv_requests_waiting"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_n_choices_per_prompt(client, model_tok, stream):
    """`n` choices per prompt, in OpenAI's order (prompt i's at i*n .. i*n+n-1): greedy choices
    equal the n=1 answer; with a seed s, choice j is the n=1 answer with seed s + j."""
    tok = model_tok[1]
    base = {"max_tokens": 8, "ignore_eos": True, "stream": stream}
    greedy = {**base, "temperature": 0}
    one = [_ask(client, {**greedy, "prompt": p})[:2] for p in ("A", "B")]
    shared = _metrics(client)["flexkv_prefills_shared_total"]
    got, usage = _batch_choices(client, {**greedy, "prompt": ["A", "B"], "n": 3,
                                         **({"stream_options": {"include_usage": True}} if stream else {})})
    assert got == [one[0]] * 3 + [one[1]] * 3
    # each prompt prefilled once: its other two choices took that prefill
    assert _metrics(client)["flexkv_prefills_shared_total"] == shared + 4
    if stream:   # as OpenAI counts: each prompt once, every choice's tokens
        n_prompt = len(tok("A")["input_ids"]) + len(tok("B")["input_ids"])
        assert usage == {"prompt_tokens": n_prompt, "completion_tokens": 48,
                         "total_tokens": n_prompt + 48}
    sampled = {**base, "temperature": 1.0, "seed": 77}
    want = [_ask(client, {**sampled, "prompt": "A", "seed": 77 + j})[:2] for j in range(3)]
    assert len(set(want)) > 1          # the choices differ
    assert _batch_choices(client, {**sampled, "prompt": "A", "n": 3})[0] == want
    msgs = [{"role": "user", "content": "hi"}]
    want = [_ask(client, {**sampled, "messages": msgs, "seed": 77 + j}, chat=True)[:2] for j in range(2)]
    assert _chat_choices(client, {**sampled, "messages": msgs, "n": 2}) == want


def _reference_logprobs(model, ids, tokens):
    """log-softmax of the logits flexkv.generate computes for `tokens` after `ids` (h2o@32)."""
    import torch

    import flexkv

    out = flexkv.generate(model, torch.tensor([ids]), max_new_tokens=len(tokens), policy="h2o",
                          budget=32, forced_tokens=torch.tensor([tokens]), output_logits=True)
    return torch.log_softmax(out.logits[0].double(), dim=-1)


def _merge_stream_logprobs(events, chat: bool):
    """The logprobs objects of a streamed choice's events, concatenated."""
    keys = ("content",) if chat else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    out = {k: [] for k in keys}
    for c in events[:-1]:
        lp = c["choices"][0]["logprobs"]
        if lp is not None:
            for k in keys:
                out[k] += lp[k]
    return out


def _completion(client, body: dict) -> tuple[str, dict | None, str]:
    """One completions choice, streamed or not -> (text, logprobs, finish_reason)."""
    if not body.get("stream"):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["text"], c["logprobs"], c["finish_reason"]
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] is not None
    lp = _merge_stream_logprobs(events, chat=False) if body.get("logprobs") is not None else None
    return ("".join(c["choices"][0]["text"] for c in events[:-1]), lp,
            events[-2]["choices"][0]["finish_reason"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_echo_and_prompt_logprobs(client, model_tok, stream):
    """`echo`: the prompt's text before the completion's (streamed: the first event); with
    `logprobs` k, the prompt tokens' entries first (the first token's null), equal to the
    log-softmax of the plain forward's logits (a one-shot prefill), offsets running on into the
    completion's; `max_tokens=0` echoes the prompt alone. As lm-evaluation-harness scores a
    continuation (`echo`, `logprobs=1`, `max_tokens=1`): the sum of the continuation's entries
    is its log-likelihood."""
    import torch

    model, tok = model_tok
    prompt = "The llama said"
    ids = tok(prompt)["input_ids"]
    T = len(ids)
    base = {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": stream}
    plain, _, _ = _completion(client, {**base, "prompt": prompt})
    text, lp, reason = _completion(client, {**base, "prompt": prompt, "echo": True})
    assert (text, lp, reason) == (prompt + plain, None, "length")
    text, _, _ = _completion(client, {**base, "prompt": ids, "echo": True})
    assert text == _decode(tok, ids) + plain                    # token ids: the prompt decoded

    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)   # [T, V]
    text, lp, reason = _completion(client, {**base, "prompt": prompt, "echo": True, "logprobs": 2})
    assert text == prompt + plain and len(lp["tokens"]) == T + 5
    alone = [tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids]
    assert lp["tokens"][:T] == alone
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(T + 5)]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, T):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        top = ref[i - 1].topk(2)
        want = {}
        for v, j in zip(top.values.tolist(), top.indices.tolist()):
            want.setdefault(tok.decode([j], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False), v)
        assert set(lp["top_logprobs"][i]) == set(want) | {alone[i]}
    gen = _reference(model, ids, 5)
    assert lp["token_logprobs"][T] == pytest.approx(ref[T - 1, gen[0]].item(), abs=1e-4)

    text, lp, reason = _completion(client, {**base, "prompt": prompt, "echo": True, "logprobs": 0,
                                            "max_tokens": 0})
    assert (text, reason) == (prompt, "length") and len(lp["token_logprobs"]) == T
    # lm-evaluation-harness's loglikelihood request: context + continuation, scored
    cont = tok(" a word", add_special_tokens=False)["input_ids"]
    body = {"prompt": ids + cont, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "stream": stream}
    _, lp, _ = _completion(client, body)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids + cont]))[0].double(), dim=-1)
    want = sum(ref[T - 1 + i, t].item() for i, t in enumerate(cont))
    assert sum(lp["token_logprobs"][T:-1]) == pytest.approx(want, abs=1e-3)
    if not stream:
        r = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()
        assert r["usage"] == {"prompt_tokens": T + len(cont), "completion_tokens": 0,
                              "total_tokens": T + len(cont)}


def test_best_of_returns_the_candidates_with_the_best_mean_logprob(client, model_tok):
    """`best_of` k with `n` m: each prompt's k candidates are the answers with seeds s .. s+k-1,
    and the m returned are those with the highest mean logprob per token, best first (logprobs
    shown only when asked); usage counts every candidate."""
    body = {"max_tokens": 6, "temperature": 1.2, "ignore_eos": True, "seed": 5}

    def one(prompt, seed):
        r = client.post("/v1/completions", json={**body, "prompt": prompt, "seed": seed, "logprobs": 0})
        c = r.json()["choices"][0]
        lps = c["logprobs"]["token_logprobs"]
        return c["text"], sum(lps) / len(lps)
    cands = {p: [one(p, 5 + j) for j in range(4)] for p in ("A", "B")}
    r = client.post("/v1/completions", json={**body, "prompt": ["A", "B"], "best_of": 4, "n": 2}).json()
    want = []
    for p in ("A", "B"):
        ranked = sorted(cands[p], key=lambda c: -c[1])
        assert ranked[0][1] > ranked[-1][1]           # the candidates differ
        want += [text for text, _ in ranked[:2]]
    assert [c["text"] for c in r["choices"]] == want
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 2 * 4 * 6        # every candidate's tokens
    tok = model_tok[1]
    assert r["usage"]["prompt_tokens"] == len(tok("A")["input_ids"]) + len(tok("B")["input_ids"])
    r = client.post("/v1/completions", json={**body, "prompt": "A", "best_of": 4, "logprobs": 1}).json()
    (c,) = r["choices"]
    assert c["text"] == want[0] and len(c["logprobs"]["token_logprobs"]) == 6
    assert sum(c["logprobs"]["token_logprobs"]) / 6 == pytest.approx(max(s for _, s in cands["A"]))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_logprobs(client, model_tok, stream):
    """Completions `logprobs=k` and chat `logprobs`/`top_logprobs`: one entry per generated
    token, equal to the log-softmax of flexkv.generate's logits for that prompt alone; each
    token's text is that token decoded alone (special tokens shown, a partial character as
    U+FFFD, so on this random byte-level model they need not join into the text), offsets count
    along them, the chosen token is among the completions' alternatives; streamed events carry
    the same entries, split along the text."""
    model, tok = model_tok
    prompt = "The llama said"
    ids = tok(prompt)["input_ids"]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    if stream:
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = sse_events(r)
        text = "".join(c["choices"][0]["text"] for c in events[:-1])
        lp = _merge_stream_logprobs(events, chat=False)
    else:
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        text, lp = choice["text"], choice["logprobs"]
    gen = _reference(model, ids, 10)
    assert text == _decode(tok, gen)
    ref = _reference_logprobs(model, ids, gen)
    alone = [tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in gen]
    assert lp["tokens"] == alone
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(10)]
    for i, t in enumerate(gen):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i, t].item(), abs=1e-4)
        want = {}
        for v, j in zip(*ref[i].topk(3)):
            want.setdefault(tok.decode([int(j)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False), float(v))
        want.setdefault(alone[i], ref[i, t].item())
        assert lp["top_logprobs"][i] == pytest.approx(want, abs=1e-4)
    # chat: the chosen token's entry with its bytes, and its 2 most likely alternatives
    msgs = [{"role": "user", "content": "hi"}]
    chat = {"messages": msgs, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    if stream:
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            events = sse_events(r)
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1])
        entries = _merge_stream_logprobs(events, chat=True)["content"]
    else:
        choice = client.post("/v1/chat/completions", json=chat).json()["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    cids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    gen = _reference(model, cids, 6)
    ref = _reference_logprobs(model, cids, gen)
    assert [e["token"] for e in entries] == [
        tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in gen]
    assert content == _decode(tok, gen)
    for i, (t, e) in enumerate(zip(gen, entries)):
        assert e["logprob"] == pytest.approx(ref[i, t].item(), abs=1e-4)
        assert e["bytes"] is None or bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(ref[i].topk(2).values.tolist(), abs=1e-4)
        assert e["top_logprobs"][0]["token"] == e["token"]           # greedy: the most likely
    # logprobs=0: the chosen token alone; a stop string: one entry per token consumed
    r = client.post("/v1/completions", json={**body, "logprobs": 0, "stop": text[4:6]}).json()
    lp, usage = r["choices"][0]["logprobs"], r["usage"]
    assert len(lp["tokens"]) == usage["completion_tokens"] < 10
    assert all(list(top) == [t] for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    # asked for nothing: null
    assert client.post("/v1/completions", json={**body, "logprobs": None}).json()["choices"][0]["logprobs"] is None


def test_16_concurrent_requests_equal_their_sequential_answers(client, main):
    bodies = []
    for i in range(16):
        chat = i % 4 == 1 or i % 4 == 3
        b = {"max_tokens": 6 + i % 7, "temperature": 0, "ignore_eos": i % 3 != 0,
             "stream": i % 2 == 0}
        if chat:
            b["messages"] = [{"role": "user", "content": f"question {i}: " + "why? " * (i % 5)}]
        else:
            b["prompt"] = f"prompt {i}: " + "and " * i
        bodies.append((b, chat))
    sequential = [_ask(client, b, chat)[:2] for b, chat in bodies]
    finished_before = _metrics(client)["flexkv_requests_finished_total"]

    async def run_all():
        async with httpx.AsyncClient(base_url=main.url, timeout=120) as ac:
            return await asyncio.gather(*[_ask_async(ac, b, chat) for b, chat in bodies])

    peak, done = [0], threading.Event()

    def sample_occupancy():               # the requests really overlap in the engine
        while not done.is_set():
            peak[0] = max(peak[0], main.engine.metrics()["slots_used"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_occupancy)
    sampler.start()
    try:
        concurrent = asyncio.run(run_all())
    finally:
        done.set()
        sampler.join()
    assert peak[0] >= 2
    assert concurrent == sequential
    assert all(text for text, _ in concurrent)
    m = _metrics(client)
    assert m["flexkv_requests_finished_total"] >= finished_before + 16
    assert m["flexkv_slots_used"] == 0 and m["flexkv_requests_waiting"] == 0


def test_openai_client(main, model_tok):
    openai = pytest.importorskip("openai")
    model, tok = model_tok
    oc = openai.OpenAI(base_url=main.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert NAME in [m.id for m in oc.models.list()]
    r = oc.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    want = _decode(tok, _reference(model, tok("Hello")["input_ids"], 8))
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    msgs = [{"role": "user", "content": "Hello"}]
    c = oc.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    parts = [ch.choices[0].delta.content or "" for ch in
             oc.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0,
                                        stream=True) if ch.choices]
    assert "".join(parts) == c.choices[0].message.content
    s = oc.completions.create(model=NAME, prompt="Hello", max_tokens=8, temperature=0, stream=True,
                              extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in s) == want
    b = oc.completions.create(model=NAME, prompt=["Hello", "Bye"], max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    assert [c.index for c in b.choices] == [0, 1] and b.choices[0].text == want
    assert b.choices[1].text == _decode(tok, _reference(model, tok("Bye")["input_ids"], 8))
    assert b.usage.completion_tokens == 16
    lp = oc.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                    max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                    extra_body={"ignore_eos": True}).choices[0].logprobs
    assert len(lp.content) == 4 and all(len(e.top_logprobs) == 2 for e in lp.content)
    lp = oc.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=1,
                               extra_body={"ignore_eos": True}).choices[0].logprobs
    assert "".join(lp.tokens) == want[:len("".join(lp.tokens))] and len(lp.token_logprobs) == 4
    e = oc.completions.create(model=NAME, prompt="Hello", max_tokens=0, echo=True, logprobs=1)
    assert e.choices[0].text == "Hello" and e.choices[0].logprobs.token_logprobs[0] is None
    assert len(e.choices[0].logprobs.tokens) == len(tok("Hello")["input_ids"])
    (b_id,) = tok("B", add_special_tokens=False)["input_ids"]
    c = oc.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                   max_tokens=3, temperature=0, logit_bias={str(b_id): 100},
                                   presence_penalty=0.1, frequency_penalty=0.1)
    assert c.choices[0].message.content == "BBB"
    with pytest.raises(openai.BadRequestError) as e:
        oc.completions.create(model=NAME, prompt="Hello", max_tokens=2, logit_bias={"x": 1})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        oc.completions.create(model=NAME, prompt="Hello", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="gpt-4", prompt="Hello", max_tokens=1)
    # structured output from a pydantic model, as the SDK sends it (a strict json_schema); with
    # whitespace biased away the object's 11-12 bytes and the end fit in max_tokens
    pydantic = pytest.importorskip("pydantic")

    class Reply(pydantic.BaseModel):
        ok: typing.Literal["yes", "no"]

    parse = getattr(oc.chat.completions, "parse", None) or oc.beta.chat.completions.parse
    r = parse(model=NAME, messages=msgs, response_format=Reply, max_tokens=MAIN_MAX_NEW,
              temperature=0, logit_bias=no_whitespace_bias(tok))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.parsed.ok in ("yes", "no")


# ----------------------------------------------------------------------------- bad input
LONG = "x" * (CTX + 10)
BAD = [
    # (id, path, raw body or JSON object, status, param)
    ("malformed-json", "c", b'{"prompt": "hi", "max_tokens": ', 400, None),
    ("not-an-object", "c", b'["hi"]', 400, None),
    ("empty-body", "c", b"", 400, None),
    ("prompt-missing", "c", {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", "c", {"prompt": 5}, 400, "prompt"),
    ("prompt-empty", "c", {"prompt": ""}, 400, "prompt"),
    ("prompt-ids-empty", "c", {"prompt": []}, 400, "prompt"),
    ("prompt-ids-negative", "c", {"prompt": [1, -2]}, 400, "prompt"),
    ("prompt-ids-out-of-vocab", "c", {"prompt": [1, VOCAB + 5]}, 400, "prompt"),
    ("prompt-too-long", "c", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("batch-empty-string", "c", {"prompt": ["hi", ""]}, 400, "prompt"),
    ("batch-empty-ids", "c", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("batch-ids-negative", "c", {"prompt": [[1], [2, -1]]}, 400, "prompt"),
    ("batch-ids-out-of-vocab", "c", {"prompt": [[1], [VOCAB]], "max_tokens": 1}, 400, "prompt"),
    ("batch-mixed", "c", {"prompt": ["hi", [1, 2]]}, 400, "prompt"),
    ("batch-nested-too-deep", "c", {"prompt": [[[1]]]}, 400, "prompt"),
    ("batch-one-too-long", "c", {"prompt": ["hi", LONG], "max_tokens": 1}, 400, "prompt"),
    ("batch-over-the-queue", "c", {"prompt": ["hi"] * 33, "max_tokens": 1}, 400, "prompt"),
    ("batch-over-the-limit", "c", {"prompt": ["hi"] * 257, "max_tokens": 1}, 400, "prompt"),
    ("batch-max-tokens-over", "c", {"prompt": ["hi", "ho"], "max_tokens": MAIN_MAX_NEW + 1}, 400, "max_tokens"),
    ("max-tokens-string", "c", {"prompt": "hi", "max_tokens": "16"}, 400, "max_tokens"),
    ("max-tokens-float", "c", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("max-tokens-zero", "c", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "c", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("max-tokens-over-server", "c", {"prompt": "hi", "max_tokens": MAIN_MAX_NEW + 1}, 400, "max_tokens"),
    ("max-tokens-huge", "c", {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    ("temperature-negative", "c", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("temperature-string", "c", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("temperature-nan", "c", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", "c", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-p-big", "c", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top-k-negative", "c", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    ("stream-string", "c", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("n-0", "c", {"prompt": "hi", "n": 0}, 400, "n"),
    ("n-over-the-limit", "c", {"prompt": "hi", "n": 257}, 400, "n"),
    ("n-over-the-queue", "c", {"prompt": "hi", "n": 33, "max_tokens": 1}, 400, "n"),
    ("n-times-batch-over-the-queue", "c", {"prompt": ["a", "b", "c"], "n": 11, "max_tokens": 1}, 400, "n"),
    ("stop-empty", "c", {"prompt": "hi", "stop": ""}, 400, "stop"),
    ("stop-too-many", "c", {"prompt": "hi", "stop": [str(i) for i in range(17)]}, 400, "stop"),
    ("stop-wrong-type", "c", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("stop-token-ids-out-of-vocab", "c", {"prompt": "hi", "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("stop-token-ids-too-many", "c", {"prompt": "hi", "stop_token_ids": list(range(17))}, 400, "stop_token_ids"),
    ("stop-token-ids-string", "c", {"prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    ("unknown-field", "c", {"prompt": "hi", "foo": 1}, 400, "foo"),
    ("logprobs-over", "c", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("logprobs-negative", "c", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("logprobs-bool", "c", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("max-tokens-zero-without-echo", "c", {"prompt": "hi", "max_tokens": 0, "echo": False}, 400, "max_tokens"),
    ("echo-string", "c", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("best-of-below-n", "c", {"prompt": "hi", "best_of": 2, "n": 3}, 400, "best_of"),
    ("best-of-stream", "c", {"prompt": "hi", "best_of": 2, "stream": True}, 400, "best_of"),
    ("best-of-zero", "c", {"prompt": "hi", "best_of": 0}, 400, "best_of"),
    ("best-of-over-the-queue", "c", {"prompt": ["a", "b"], "best_of": 17, "max_tokens": 1}, 400, "best_of"),
    ("presence-penalty-over", "c", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency-penalty-string", "c", {"prompt": "hi", "frequency_penalty": "1"}, 400, "frequency_penalty"),
    ("repetition-penalty-zero", "c", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("repetition-penalty-huge", "c", {"prompt": "hi", "repetition_penalty": 1e300}, 400, "repetition_penalty"),
    ("logit-bias-key", "c", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("logit-bias-negative-key", "c", {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ("logit-bias-value", "c", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit-bias-out-of-vocab", "c", {"prompt": "hi", "logit_bias": {str(VOCAB): 1}}, 400, "logit_bias"),
    ("min-tokens-over-max-tokens", "c", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("min-tokens-negative", "c", {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("stream-options-without-stream", "c", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("unknown-model", "c", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("messages-missing", "chat", {"max_tokens": 3}, 400, "messages"),
    ("messages-empty", "chat", {"messages": []}, 400, "messages"),
    ("messages-not-list", "chat", {"messages": "hi"}, 400, "messages"),
    ("bad-role", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("image-part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages"),
    ("message-extra-field", "chat", {"messages": [{"role": "user", "content": "hi", "x": 1}]}, 400, "messages"),
    ("chat-too-long", "chat", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("chat-n-0", "chat", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("chat-n-over-the-queue", "chat", {"messages": [{"role": "user", "content": "hi"}], "n": 40}, 400, "n"),
    ("chat-logit-bias-out-of-vocab", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                              "logit_bias": {str(VOCAB + 7): -100}}, 400, "logit_bias"),
    ("chat-presence-penalty-nan", "chat", b'{"messages": [{"role": "user", "content": "hi"}], '
                                          b'"presence_penalty": NaN}', 400, "presence_penalty"),
    ("chat-tools", "chat", {"messages": [{"role": "user", "content": "hi"}],
                            "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat-json-schema", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                  "response_format": {"type": "json_schema", "json_schema": {}}},
     400, "response_format"),
    ("response-format-unknown-type", "c", {"prompt": "hi", "response_format": {"type": "yaml"}},
     400, "response_format"),
    ("response-format-string", "c", {"prompt": "hi", "response_format": "json_object"}, 400,
     "response_format"),
    ("chat-logprobs-int", "chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 2}, 400, "logprobs"),
    ("chat-top-logprobs-alone", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                         "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat-top-logprobs-over", "chat", {"messages": [{"role": "user", "content": "hi"}],
                                        "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client, path, body, status, param):
    url = "/v1/chat/completions" if path == "chat" else "/v1/completions"
    if isinstance(body, bytes):
        r = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    assert "\n" not in err["message"]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode(client, chat, stream):
    """`response_format: {"type": "json_object"}`: the text is a JSON object when the request
    stops, a valid beginning of one when `max_tokens` cuts it (flexkv.serve.json_mode; the
    engine side is tests/test_serve_json.py)."""
    from flexkv.serve.json_mode import JsonRequest
    from flexkv.serve.json_schema import compile_schema
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "why": {"type": "string", "maxLength": 12}},
              "required": ["answer"]}
    formats = [({"type": "json_object"}, {"type": "object"}),
               ({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}, schema)]
    for fmt, want in formats:
        body = {"max_tokens": MAIN_MAX_NEW, "temperature": 0.8, "stream": stream, "response_format": fmt}
        body |= ({"messages": [{"role": "user", "content": "Reply in JSON."}]} if chat
                 else {"prompt": "JSON: "})
        for seed in range(3):
            text, reason, _ = _ask(client, dict(body, seed=seed), chat=chat)
            req = JsonRequest(compile_schema(want))
            assert req.advance(text.encode()), text
            if reason == "stop":
                value = json.loads(text)
                assert req.done and isinstance(value, dict), text
                assert fmt["type"] == "json_object" or (value["answer"] in ("yes", "no") and set(value) <= {"answer", "why"})
            else:
                assert reason == "length"


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema", "json_schema": {}}, "name must be 1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}, "unknown field 'extra'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict must be a bool"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}},
     "json_schema at /pattern: pattern '(?=a)' at 1: lookaround and other (?...) groups are not supported"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "multipleOf": 2}}},
     "json_schema at /multipleOf: the keyword 'multipleOf' is not supported"),
    ({"type": "json_schema"}, 'must be {"type": "json_schema", "json_schema"'),
    ({"type": "yaml"}, "('yaml' is not supported)"),
])
def test_response_format_errors_name_what_is_wrong(client, fmt, message):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = client.post(path, json=body | {"response_format": fmt})
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert message in e["message"] and e["param"] == "response_format", e


def test_bad_request_messages_are_clear(client):
    e = client.post("/v1/completions", json={"prompt": "hi", "n": 33, "max_tokens": 1}).json()["error"]
    assert e["message"].startswith("33 choices (n x prompts) in one request are more than the 32")
    e = client.post("/v1/completions", json={"prompt": "hi", "foo": 1}).json()["error"]
    assert e["message"] == "Unrecognized request argument supplied: foo"
    e = client.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"}).json()
    assert e["error"]["message"].startswith("Malformed JSON")
    e = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 999}).json()["error"]
    assert "max_tokens" in e["message"] and str(MAIN_MAX_NEW) in e["message"]


def test_batch_error_messages_name_the_prompt(client):
    e = client.post("/v1/completions", json={"prompt": ["hi", ""]}).json()["error"]
    assert e["message"] == "prompt: the prompt must not be empty (item 1 of the batch)"
    e = client.post("/v1/completions", json={"prompt": [[1], [VOCAB]], "max_tokens": 1}).json()["error"]
    assert e["message"] == f"prompt: token ids must be in [0, {VOCAB - 1}] (prompt 1 of the 2)"
    e = client.post("/v1/completions", json={"prompt": ["hi"] * 33, "max_tokens": 1}).json()["error"]
    assert e["message"].startswith("33 prompts in one request are more than the 32 requests")
    assert _metrics(client)["flexkv_requests_waiting"] == 0


def test_unknown_path_and_method(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


# ----------------------------------------------------------------------------- queue, disconnects
def test_queue_full_is_429_then_the_waiting_requests_complete(held, model_tok):
    """The engine is not running yet: its two waiting places fill up, the third request is
    refused with 429; started, the engine answers the two waiting requests completely."""
    model, tok = model_tok
    body = {"prompt": "wait for it", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    results = {}

    def ask(key, stream):
        with httpx.Client(base_url=held.url, timeout=60) as c:
            results[key] = _ask(c, {**body, "stream": stream})

    threads = [threading.Thread(target=ask, args=(k, k == 1)) for k in range(2)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=held.url, timeout=60) as c:
        _wait_until(lambda: _metrics(c)["flexkv_requests_waiting"] == 2, what="2 waiting")
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 429, r.text
        assert r.headers.get("retry-after") == "1"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        assert "queue is full" in err["message"]
        assert _metrics(c)["flexkv_http_rejected_queue_full_total"] == 1
        assert c.get("/health").status_code == 200
    held.engine.start()
    for t in threads:
        t.join(60)
    want = _decode(tok, _reference(model, tok(body["prompt"])["input_ids"], 5))
    assert results[0][:2] == results[1][:2] == (want, "length")


def test_a_batch_is_queued_all_or_none(held, model_tok):
    """2 waiting places, one taken: a batch of 2 gets 429 and queues nothing (the waiting count
    stays 1); a batch of 2 that fits is answered in full once the engine runs."""
    model, tok = model_tok
    body = {"prompt": "wait for it", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    results = {}

    def ask(key, b):
        with httpx.Client(base_url=held.url, timeout=60) as c:
            results[key] = _batch_choices(c, b)[0] if isinstance(b["prompt"], list) else _ask(c, b)

    first = threading.Thread(target=ask, args=("one", body))
    first.start()
    with httpx.Client(base_url=held.url, timeout=60) as c:
        _wait_until(lambda: _metrics(c)["flexkv_requests_waiting"] == 1, what="1 waiting")
        r = c.post("/v1/completions", json={**body, "prompt": ["a", "b"]})
        assert r.status_code == 429, r.text
        assert "no room for the 2 requests this one needs" in r.json()["error"]["message"]
        assert _metrics(c)["flexkv_requests_waiting"] == 1
    held.engine.start()
    first.join(60)
    ask("two", {**body, "prompt": ["a", "wait for it"], "stream": True})
    want = _decode(tok, _reference(model, tok(body["prompt"])["input_ids"], 5))
    assert results["one"][:2] == (want, "length")
    assert results["two"][1] == (want, "length")
    assert results["two"][0] == (_decode(tok, _reference(model, tok("a")["input_ids"], 5)), "length")


def test_engine_shutdown_ends_waiting_requests_cleanly(held):
    """Requests still waiting when the engine shuts down end with a 503 error body (JSON) or an
    error event then [DONE] (stream); later requests get 503, not a 500."""
    body = {"prompt": "never", "max_tokens": 5, "temperature": 0}
    results = {}

    def ask(stream):
        with httpx.Client(base_url=held.url, timeout=60) as c:
            if stream:
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    results[stream] = (r.status_code, sse_events(r))
            else:
                r = c.post("/v1/completions", json=body)
                results[stream] = (r.status_code, r.json())

    threads = [threading.Thread(target=ask, args=(s,)) for s in (False, True)]
    for t in threads:
        t.start()
    _wait_until(lambda: held.engine.metrics()["waiting"] == 2, what="2 waiting")
    held.engine.shutdown()
    for t in threads:
        t.join(60)
    status, err = results[False]
    assert status == 503 and err["error"]["code"] == "cancelled"
    status, events = results[True]
    assert status == 200 and events[-1] == "[DONE]" and events[0]["error"]["code"] == "cancelled"
    r = httpx.post(held.url + "/v1/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def _aux_running_handle(aux, n_before):
    _wait_until(lambda: len(aux.handles) > n_before and len(aux.handles[-1].tokens) >= 1,
                what="the request to start generating")
    return aux.handles[-1]


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(aux):
    n = len(aux.handles)
    body = {"prompt": "a long story", "max_tokens": AUX_MAX_NEW, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=aux.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # leaving the block closes the connection with the stream unfinished
        h = aux.handles[n]
        _wait_until(lambda: h.finish_reason is not None, what="the cancel")
        assert h.finish_reason == "cancelled" and len(h.tokens) < AUX_MAX_NEW
        _wait_until(lambda: aux.engine.metrics()["slots_used"] == 0, what="the slot to free")
        assert _metrics(c)["flexkv_http_client_disconnects_total"] >= 1
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_client_disconnect_cancels_every_prompt_of_a_batch(aux, stream):
    """1 slot: the batch's first prompt decodes while the second waits; the client goes away
    and both end cancelled, the slot and the queue empty."""
    n = len(aux.handles)
    body = {"prompt": ["a long story", "another one"], "max_tokens": AUX_MAX_NEW - 40,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", aux.port)) as s:
        s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload)
        _wait_until(lambda: len(aux.handles) >= n + 2 and len(aux.handles[n].tokens) >= 1,
                    what="the batch's first prompt to start generating")
    a, b = aux.handles[n:n + 2]
    _wait_until(lambda: a.finish_reason is not None and b.finish_reason is not None, what="the cancels")
    assert a.finish_reason == b.finish_reason == "cancelled"
    assert len(a.tokens) < body["max_tokens"]
    _wait_until(lambda: aux.engine.metrics()["slots_used"] == 0 and aux.engine.metrics()["waiting"] == 0,
                what="the slot and the queue to empty")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_without_streaming_cancels(aux, path):
    n = len(aux.handles)
    body = {"max_tokens": AUX_MAX_NEW - 40, "temperature": 0, "ignore_eos": True}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "go on"}]
    else:
        body["prompt"] = "go on"
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", aux.port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        h = _aux_running_handle(aux, n)
    _wait_until(lambda: h.finish_reason is not None, what="the cancel")
    assert h.finish_reason == "cancelled" and len(h.tokens) < body["max_tokens"]
    _wait_until(lambda: aux.engine.metrics()["slots_used"] == 0, what="the slot to free")


# ----------------------------------------------------------------------------- fuzzing
FUZZ_OPS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/v1/models/{model_id}"), ("POST", "/tokenize"), ("POST", "/detokenize"),
            ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def fuzz(model_tok):
    """A server for fuzzing: at most 4 new tokens per request (its schema says so), so the
    valid requests schemathesis draws stay quick."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=4, max_new_tokens=4,
                    max_waiting=32, compile=False)
    with BackgroundServer(build_app(engine, NAME)) as srv:
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz):
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(fuzz.url + "/openapi.json")
    ops = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert ops == set(FUZZ_OPS), ops          # every endpoint is fuzzed
    return schema


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method,path", FUZZ_OPS, ids=[f"{m} {p}" for m, p in FUZZ_OPS])
def test_fuzz_api_from_its_openapi_schema(api_schema, fuzz, method, path, mode):
    """schemathesis draws requests from the app's own OpenAPI schema (valid ones, and invalid
    ones in `negative` mode): never a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    if mode == "negative" and method == "GET":
        pytest.skip("no body or query to make invalid (a path string stays a string)")
    op = api_schema[path][method]
    post = method == "POST"

    @given(case=op.as_strategy(GenerationMode(mode)))
    @settings(max_examples=25 if post else 10, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    check()
    assert fuzz.thread.is_alive()
    assert httpx.get(fuzz.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- afterwards
def test_still_healthy_after_everything(client, main, aux, fuzz):
    assert client.get("/health").json() == {"status": "ok"}
    assert httpx.get(fuzz.url + "/health").json() == {"status": "ok"}
    for engine in (main.engine, aux.engine, fuzz.engine):
        _wait_until(lambda: engine.metrics()["slots_used"] == 0 and engine.metrics()["waiting"] == 0,
                    what="idle engines")
    m = _metrics(client)
    assert m["flexkv_requests_running"] == 0 and m["flexkv_slot_occupancy"] == 0
    assert _ask(client, {"prompt": "still there?", "max_tokens": 3, "temperature": 0,
                         "ignore_eos": True})[1] == "length"


def test_prefix_cache_over_http(model_tok):
    """Chat requests that share a system prompt: the later ones resume from the kept prefix
    (`/metrics`), and every answer equals `flexkv.generate` on its prompt alone."""
    import torch

    import flexkv

    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=2, max_new_tokens=8,
                    prefill_chunk=8, prefix_cache_memory="64MiB", compile=False)
    system = {"role": "system", "content": "You answer questions about this text. " * 3}
    with BackgroundServer(build_app(engine, NAME)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        for i, question in enumerate(["What is it about?", "Who wrote it?", "Why?"]):
            messages = [system, {"role": "user", "content": question}]
            text, _, usage = _ask(c, dict(messages=messages, max_tokens=6, temperature=0,
                                          ignore_eos=True), chat=True)
            ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]   # as the server tokenizes
            want = flexkv.generate(model, torch.tensor([ids]), max_new_tokens=6, policy="h2o",
                                   budget=32, prefill_chunk=8).tokens[0, len(ids):].tolist()
            assert text == _decode(tok, want), question
            assert usage["prompt_tokens"] == len(ids)
        m = _metrics(c)
    shared = len(tok.apply_chat_template([system], tokenize=False))  # chars: ~ byte tokens
    assert m["flexkv_prefix_cache_hits_total"] == 2
    assert m["flexkv_prefix_cache_tokens_total"] >= 2 * (shared // 8 - 1) * 8
    assert 0 < m["flexkv_prefix_cache_bytes"] <= 64 * 2**20


# ----------------------------------------------------------------------------- tokenize
def test_tokenize_and_detokenize(client, model_tok):
    """`/tokenize` (as vLLM's): a prompt's ids as /v1/completions tokenizes it, a conversation's
    as /v1/chat/completions renders it (the same count as its usage); `/detokenize` inverts it;
    bad input is a 400 that names the field."""
    _, tok = model_tok
    r = client.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["tokens"] == tok("Hello there")["input_ids"] and d["count"] == len(d["tokens"])
    assert d["max_model_len"] == CTX and d["token_strs"] == tok.convert_ids_to_tokens(d["tokens"])
    bare = client.post("/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok("Hello there", add_special_tokens=False)["input_ids"]
    assert bare["token_strs"] is None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = client.post("/tokenize", json={"model": NAME, "messages": msgs}).json()
    done = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()
    assert chat["count"] == done["usage"]["prompt_tokens"]
    assert chat["tokens"] == tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                 add_special_tokens=False)["input_ids"]
    open_turn = client.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert open_turn["tokens"] == chat["tokens"][:len(open_turn["tokens"])] < chat["tokens"]
    back = client.post("/detokenize", json={"tokens": bare["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello there"}
    for path, body, status, param in [
            ("/tokenize", {"prompt": 1}, 400, "prompt"),
            ("/tokenize", {"prompt": "x", "max_tokens": 3}, 400, "max_tokens"),
            ("/tokenize", {"messages": [], "prompt": "x"}, 400, None),
            ("/tokenize", {"messages": [{"role": "user"}]}, 400, "messages"),
            ("/tokenize", {"messages": msgs, "tool_choice": "required"}, 400, "tool_choice"),
            ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
            ("/tokenize", [], 400, None),
            ("/detokenize", {"tokens": [1, VOCAB]}, 400, "tokens"),
            ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
            ("/detokenize", {"tokens": [1], "model": "gpt-4"}, 404, "model")]:
        r = client.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        e = r.json()["error"]
        assert param is None or e["param"] == param, (body, e)
    assert "tokens[1]: token ids must be in [0, " in client.post(
        "/detokenize", json={"tokens": [1, VOCAB]}).json()["error"]["message"]


def test_a_schema_over_its_mask_time_is_a_400_or_an_error_event(model_tok):
    """A structured request ended by the engine for its masks' time (`max_mask_seconds`): a 400
    with code `schema_too_costly` that says why, or streamed, an error event and then [DONE];
    the server answers the next request."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=8,
                    max_waiting=4, compile=False, max_mask_seconds=1e-9)  # every one is over it
    body = {"prompt": "hi", "max_tokens": 8, "response_format": {"type": "json_object"}}
    with BackgroundServer(build_app(engine, NAME)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        e = r.json()["error"]
        assert e["code"] == "schema_too_costly" and e["message"].startswith("structured output: ")
        assert "more than 1e-09 s" in e["message"], e
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "schema_too_costly"
        plain = {"prompt": "hi", "max_tokens": 3}
        assert c.post("/v1/completions", json=plain).status_code == 200
        assert _metrics(c)["flexkv_structured_over_budget_total"] == 2


# ----------------------------------------------------------------------------- body size
def test_a_body_over_the_limit_is_a_413(model_tok):
    """`build_app(max_body_bytes=)`: a body over it is a 413 with OpenAI's error body, whether
    its Content-Length says so (nothing read) or it comes chunked (cut off as it passes the
    limit); bodies under it work; the server goes on."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=4,
                    max_waiting=4, compile=False)
    limit = 2000
    with BackgroundServer(build_app(engine, NAME, max_body_bytes=limit)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        big = json.dumps({"prompt": "x" * limit, "max_tokens": 1}).encode()

        def chunked():
            for i in range(0, len(big), 256):
                yield big[i:i + 256]
        for body in (lambda: big, chunked):          # with a Content-Length; chunked
            for path in ("/v1/completions", "/tokenize"):
                r = c.post(path, content=body(), headers={"Content-Type": "application/json"})
                assert r.status_code == 413, r.text
                e = r.json()["error"]
                assert e["code"] == "request_too_large" and f"at most {limit} bytes" in e["message"], e
        r = c.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert c.get("/health").status_code == 200


# ----------------------------------------------------------------------------- the API key
def test_an_api_key_guards_v1(model_tok):
    """`build_app(..., api_key=)` / `flexkv serve --api-key`: every /v1 request without
    `Authorization: Bearer <key>` is a 401 with OpenAI's error body, before its body is read (a
    malformed one too); with the key, requests and streams work as without one; /health,
    /metrics and the OpenAPI schema (which states the key) stay open."""
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=4,
                    max_waiting=4, compile=False)
    with pytest.raises(ValueError, match="api_key"):
        build_app(engine, NAME, api_key=" ")
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    with BackgroundServer(build_app(engine, NAME, api_key="s3cret")) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        for headers, why in (({}, "didn't provide an API key"),
                             ({"Authorization": "Bearer nope"}, "Incorrect API key"),
                             ({"Authorization": "Bearer s3cret-and-more"}, "Incorrect API key"),
                             ({"Authorization": "Basic s3cret"}, "didn't provide an API key"),
                             ({"Authorization": "Bearer"}, "didn't provide an API key")):
            for method, path, kw in (("POST", "/v1/completions", {"json": body}),
                                     ("POST", "/v1/chat/completions", {"content": b"{not json"}),
                                     ("GET", "/v1/models", {}), ("GET", "/v1/nowhere", {}),
                                     ("POST", "/tokenize", {"json": {"prompt": "hi"}}),
                                     ("POST", "/detokenize", {"json": {"tokens": [1]}})):
                r = c.request(method, path, headers=headers, **kw)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
                e = r.json()["error"]
                assert why in e["message"] and e["code"] == "invalid_api_key", e
        key = {"Authorization": "Bearer s3cret"}
        r = c.post("/v1/completions", json=body, headers=key)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert c.post("/v1/completions", content=b"{not json", headers=key).status_code == 400
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}, headers=key) as r:
            assert r.status_code == 200 and sse_events(r)[-1] == "[DONE]"
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        spec = c.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"apiKey": []}]
        assert spec["paths"]["/tokenize"]["post"]["security"] == [{"apiKey": []}]
        assert "security" not in spec["paths"]["/health"]["get"]
        assert c.post("/tokenize", json={"prompt": "hi"}, headers=key).json()["count"] >= 2
        openai = pytest.importorskip("openai")
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="hi", max_tokens=1).usage.completion_tokens == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).models.list()


# ----------------------------------------------------------------------------- the CLI
def test_cli_serve_bad_arguments_exit_2(tiny_chat_dir, capsys):
    from flexkv.cli import main as cli

    base = ["serve", "--model", str(tiny_chat_dir)]
    for extra, needle in [(["--port", "70000"], "--port"), (["--max-slots", "0"], "--max-slots"),
                          (["--max-slots", "2", "--kv-memory", "1GiB"], "not allowed with"),
                          (["--policy", "nope"], "nope"), (["--max-waiting", "0"], "--max-waiting"),
                          (["--kv-memory", "lots"], "kv_memory"),
                          (["--prefix-cache-memory", "0"], "--prefix-cache-memory"),
                          (["--api-key", " "], "--api-key"),
                          (["--max-mask-seconds", "0"], "--max-mask-seconds"),
                          (["--max-mask-seconds", "nan"], "--max-mask-seconds"),
                          (["--max-mask-seconds", "soon"], "--max-mask-seconds")]:
        assert cli(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert needle in err, (extra, err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli(base + ["--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "listen" in err[0]


def test_cli_serve_passes_its_engine_options(tiny_chat_dir):
    """`flexkv serve`'s engine flags reach `flexkv.serve.server.serve` (the compiled chunk prefill
    itself is tested in test_serve_engine.py; compiling it again here cost ~30 s of CI)."""
    from flexkv.cli import main as cli

    with mock.patch("flexkv.serve.server.serve") as serve:
        assert cli(["serve", "--model", str(tiny_chat_dir), "--port", "0", "--policy", "h2o",
                    "--budget", "16", "--param", "recent=4", "--max-slots", "3",
                    "--max-new-tokens", "8", "--max-prompt-tokens", "64", "--prefill-chunk", "8",
                    "--compile-prefill", "--no-compile", "--max-waiting", "5",
                    "--prefix-cache-memory", "1GiB", "--api-key", "s3cret",
                    "--max-mask-seconds", "2.5"]) == 0
    (model,), kw = serve.call_args
    assert model == str(tiny_chat_dir)
    assert {k: kw[k] for k in ("policy", "budget", "recent", "max_slots", "max_new_tokens",
                               "max_prompt_tokens", "prefill_chunk", "compile_prefill",
                               "compile", "max_waiting", "prefix_cache_memory",
                               "max_mask_seconds")} == dict(
        policy="h2o", budget=16, recent=4, max_slots=3, max_new_tokens=8, max_prompt_tokens=64,
        prefill_chunk=8, compile_prefill=True, compile=False, max_waiting=5,
        prefix_cache_memory="1GiB", max_mask_seconds=2.5)
    assert kw["api_key"] == "s3cret"
    kw["sock"].close()
    for env, want in (({"FLEXKV_API_KEY": "from-env"}, "from-env"), ({}, None)):
        with mock.patch("flexkv.serve.server.serve") as serve, mock.patch.dict("os.environ", env):
            if not env:
                __import__("os").environ.pop("FLEXKV_API_KEY", None)
            assert cli(["serve", "--model", str(tiny_chat_dir), "--port", "0"]) == 0
        assert serve.call_args[1]["api_key"] == want
        assert serve.call_args[1]["max_mask_seconds"] == 10.0
        serve.call_args[1]["sock"].close()


def test_cli_serve_end_to_end(tiny_chat_dir):
    """`python -m flexkv serve` in a subprocess: it prints its address, answers a prompt of more
    than one prefill chunk, stops on SIGINT."""
    import signal

    cmd = [sys.executable, "-m", "flexkv", "serve", "--model", str(tiny_chat_dir), "--port", "0",
           "--policy", "h2o", "--budget", "16", "--param", "recent=4", "--max-slots", "2",
           "--max-new-tokens", "8", "--served-model-name", "tiny", "--prefill-chunk", "8"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        url, seen = None, []
        deadline = time.monotonic() + 120
        while url is None:
            line = p.stderr.readline()
            assert line or p.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            seen.append(line)
            m = re.search(r"serving tiny at (http://\S+)/v1", line)
            if m:
                url = m.group(1)
        with httpx.Client(base_url=url, timeout=300) as c:  # the first request compiles
            _wait_until(lambda: _ok(c), timeout=60, what="the server")
            prompt = "hi there, a prompt of more than one chunk"
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert r.json()["usage"]["prompt_tokens"] > 8
        p.send_signal(signal.SIGINT)
        assert p.wait(60) in (0, 130)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ok(c) -> bool:
    try:
        return c.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def test_readme_server_over_an_own_engine_runs(model_tok):
    """The README's "engine in Python" example of the HTTP server over an engine of one's own
    (its imports, `build_app`, `BackgroundServer`) runs as written, and the server it starts
    answers; it shuts the engine down on leaving."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### The engine in Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = block[block.index("# the HTTP server over an engine of your own"):]
    assert "BackgroundServer(build_app(engine" in code
    model, tok = model_tok
    engine = Engine(model, tok, policy="h2o", budget=32, max_slots=1, max_new_tokens=4,
                    max_waiting=4, compile=False)
    code = code.replace("    ...", "    answers.append(httpx.get(srv.url + '/health').json())")
    answers: list = []
    exec(compile(code, "README.md", "exec", dont_inherit=True),
         {"engine": engine, "httpx": httpx, "answers": answers})
    assert answers == [{"status": "ok"}]
    assert engine._thread is None             # stopped with the server


def _answered_meanwhile(url: str, path: str, body, meanwhile=None, within: float = 1.0):
    """POST `body` to `path` in a thread (a request whose work a test made take 2 s) and, while
    it runs, check that the server answers /health (and `meanwhile(url)`, if given) within
    `within` seconds; then the slow request's response."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=httpx.post(f"{url}{path}", json=body,
                                                                timeout=60)))
    t.start()
    time.sleep(0.4)                               # the slow work has begun
    start = time.perf_counter()
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200
    if meanwhile is not None:
        meanwhile(url)
    assert time.perf_counter() - start < within   # not behind the slow work
    t.join()
    return out["r"]


def test_a_schemas_compile_does_not_hold_the_event_loop(main, monkeypatch):
    """A request's JSON Schema compiles in a worker thread: while a slow one compiles (here 2 s,
    made so), the server answers /health at once and another request streams; then the slow
    request is answered. Its errors are still 400s naming the field."""
    import flexkv.serve.protocol as protocol

    real = protocol.compile_schema

    def slow(schema):
        if isinstance(schema, dict) and schema.get("description") == "slow":
            time.sleep(2.0)
        return real(schema)
    monkeypatch.setattr(protocol, "compile_schema", slow)
    body = {"prompt": "hi", "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "description": "slow"}}}}
    def streams(url):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 2, "stream": True}) as r:
            assert sse_events(r)[-1] == "[DONE]"
    r = _answered_meanwhile(main.url, "/v1/completions", body, streams, within=1.5)
    assert r.status_code == 200, r.text
    bad = body["response_format"]["json_schema"] | {"schema": {"type": "integer", "multipleOf": 2}}
    e = httpx.post(f"{main.url}/v1/completions", timeout=60,
                   json=body | {"response_format": {"type": "json_schema", "json_schema": bad}}).json()
    assert e["error"]["param"] == "response_format" and "multipleOf" in e["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_tokenizing_a_prompt_does_not_hold_the_event_loop(main, model_tok, monkeypatch, path):
    """A request's tokenizer work (its chat template, encoding a prompt of up to 4M characters,
    ~3 s with the default model's tokenizer) runs in the tokenizer's worker thread: while a slow
    one runs (here 2 s, made so), the event loop answers at once (new requests' tokenizer work
    queues behind it in that one thread, as in vLLM)."""
    _, tok = model_tok
    real = type(tok).__call__

    def slow(self, text, *a, **kw):
        if "slow-marker" in str(text):
            time.sleep(2.0)
        return real(self, text, *a, **kw)
    monkeypatch.setattr(type(tok), "__call__", slow)
    body = ({"messages": [{"role": "user", "content": "slow-marker"}], "max_tokens": 2}
            if "chat" in path else {"prompt": "slow-marker", "max_tokens": 2})
    if path == "/tokenize":
        body.pop("max_tokens")
    r = _answered_meanwhile(main.url, path, body, lambda url: httpx.get(f"{url}/v1/models",
                                                                        timeout=60))
    assert r.status_code == 200, r.text


def test_oversized_lists_are_refused_before_their_items_are_validated(client, monkeypatch):
    """A conversation of more than `MAX_MESSAGES` messages, a logit_bias of more than
    `MAX_LOGIT_BIAS` entries, a prompt of more token ids than `MAX_PROMPT_CHARS`: a 400 naming
    the field, counted before any item is validated (2,000,000 messages took 8.6 s to validate,
    holding the event loop); the OpenAPI schema states the bounds."""
    import flexkv.serve.protocol as protocol

    n = protocol.MAX_MESSAGES + 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * n})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert f"at most {protocol.MAX_MESSAGES} messages, got {n}" in r.json()["error"]["message"]
    parts = [{"type": "text", "text": "x"}] * (n // 2)
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": parts}, {"role": "assistant", "tool_calls": [call] * (n // 2 + 1)}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert f"at most {protocol.MAX_MESSAGES} content parts and tool calls in all the messages, " \
        f"got {n}" in r.json()["error"]["message"]
    bias = {str(i): 1 for i in range(protocol.MAX_LOGIT_BIAS + 1)}
    r = client.post("/v1/completions", json={"prompt": "hi", "logit_bias": bias})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert "at most 131072 logit_bias entries" in r.json()["error"]["message"]
    monkeypatch.setattr(protocol, "MAX_PROMPT_CHARS", 100)
    r = client.post("/v1/completions", json={"prompt": list(range(101))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "at most 100 token ids (or prompts) in prompt" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [[1] * 60, [2] * 41]})
    assert r.status_code == 400 and "at most 100 token ids in the batch's prompts in all, got 101" \
        in r.json()["error"]["message"], r.text
    for field, value, what in (("stop", ["a"] * 17, "stop strings"),
                               ("stop_token_ids", [1] * 17, "stop_token_ids")):
        r = client.post("/v1/completions", json={"prompt": "hi", field: value})
        assert r.status_code == 400 and f"at most 16 {what}, got 17" in r.text, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "tools": [{"type": "function"}] * 129})
    assert r.status_code == 400 and "at most 128 tools, got 129" in r.text, r.text
    r = client.post("/detokenize", json={"tokens": list(range(101))})
    assert r.status_code == 400 and "at most 100 token ids" in r.text, r.text
    props = client.get("/openapi.json").json()["components"]["schemas"]
    chat = props["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == protocol.MAX_MESSAGES
    bias_schema = next(b for b in chat["logit_bias"]["anyOf"] if b.get("type") == "object")
    assert bias_schema["maxProperties"] == protocol.MAX_LOGIT_BIAS


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_building_a_whole_response_does_not_hold_the_event_loop(main, monkeypatch, path):
    """A non-streamed completion's body (64 choices of 512 tokens with 20 logprobs each took
    ~6 s to build, and FastAPI would validate and render it again) is built and rendered in a
    worker thread: while one is made to take 2 s, the server answers at once; the body is what
    FastAPI would have sent."""
    from flexkv.serve import protocol

    model = protocol.ChatCompletionResponse if "chat" in path else protocol.CompletionResponse
    real = model.model_dump

    def slow(self, *a, **kw):
        time.sleep(2.0)
        return real(self, *a, **kw)
    monkeypatch.setattr(model, "model_dump", slow)
    body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else
            {"prompt": "hi", "logprobs": 2}) | {"max_tokens": 3}
    r = _answered_meanwhile(main.url, path, body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert model.model_validate(r.json()).usage.completion_tokens == 3
