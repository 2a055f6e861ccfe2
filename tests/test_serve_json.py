"""JSON mode (`response_format="json_object"`, flexkv.serve.json_mode).

- The recognizer against Python's `json` (hypothesis): every JSON object, dumped compact or
  indented, is accepted byte by byte and ends complete; every prefix of it is accepted; on
  random strings over JSON's alphabet, "accepted and complete" is exactly "`json.loads` gives a
  dict" (no NaN / Infinity, RFC whitespace only).
- The masks against brute force (hypothesis): for states reached by random valid prefixes, a
  vocabulary of random multi-byte tokens (brackets, quotes, escapes, digits, letters), the
  memoized mask equals simulating every token's bytes.
- The engine: requests in JSON mode beside plain ones (a byte-level tokenizer and the tiny
  float64 model): every token is one the recognizer takes, a request that stops has produced a
  JSON object (`json.loads`), one cut by `max_tokens` a valid prefix of one; the plain requests'
  tokens are those of `flexkv.generate` alone; a slot that held a JSON request serves the next
  one as a fresh engine. Greedy and sampled, with penalties and `min_tokens` on top.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import flexkv
from flexkv.serve import Engine, SamplingParams
from flexkv.serve import json_mode
from flexkv.serve.json_mode import MAX_WS_RUN, JsonRequest, JsonVocab, initial, is_done
from flexkv.serve.json_schema import JSON_OBJECT
from test_serve_engine import SETTINGS, random_prompt, solo

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small eager steps of a tiny model

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
OBJECTS = st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4)
ALPHABET = '{}[]":,0123456789.eE+-truefalsn \\u\n\tx'


INITIAL = initial(JSON_OBJECT)


def step(state, b):
    return json_mode.step(JSON_OBJECT, state, b)


def feed(state, data):
    return json_mode.feed(JSON_OBJECT, state, data)


def accepts(text: str) -> bool:
    return is_done(feed(INITIAL, text.encode()))


def loads_object(text: str) -> bool:
    def no_constant(name):
        raise ValueError(name)
    try:
        return isinstance(json.loads(text, parse_constant=no_constant), dict)
    except ValueError:
        return False


@settings(max_examples=300, deadline=None)
@given(obj=OBJECTS, indent=st.sampled_from([None, 0, 2]), ascii_=st.booleans())
def test_every_object_and_each_prefix_is_accepted(obj, indent, ascii_):
    data = f" {json.dumps(obj, indent=indent, ensure_ascii=ascii_)}\n".encode()
    state = INITIAL
    for b in data:
        state = step(state, b)
        assert state, data
    assert is_done(state)


@settings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=24) | OBJECTS.map(json.dumps).flatmap(
    lambda s: st.integers(0, len(s)).flatmap(
        lambda i: st.text(alphabet=ALPHABET, max_size=3).map(lambda x: s[:i] + x + s[i + len(x):]))))
def test_accepting_is_json_loads_of_an_object(text):
    assert accepts(text) == loads_object(text), text
    if accepts(text):   # and every prefix is a state
        assert all(feed(INITIAL, text[:i].encode()) for i in range(len(text)))


@settings(max_examples=300, deadline=None)
@given(number=st.text(alphabet="0123456789.eE+-", min_size=1, max_size=7), ws=st.sampled_from(["", " "]))
def test_numbers_are_json_numbers(number, ws):
    for text in (f'{{"a":{number}{ws}}}', f'{{"a":[{number}{ws}]}}', f'{{"a":[1,{number}{ws},2]}}'):
        assert accepts(text) == loads_object(text), text


STRING_PIECES = st.lists(st.integers(0x80, 0xFF).map(lambda b: bytes([b]))
                         | st.characters(min_codepoint=0x20, exclude_characters='"\\',
                                         exclude_categories=["Cs"]).map(str.encode), max_size=6)


@settings(max_examples=500, deadline=None)
@given(pieces=STRING_PIECES)
def test_strings_hold_well_formed_utf8(pieces):
    """Stray bytes of multi-byte characters among whole ones: a string takes exactly the
    well-formed UTF-8 (the text always decodes), as a key and as a value."""
    data = b"".join(pieces)
    try:
        data.decode("utf-8")
        ok = True
    except UnicodeDecodeError:
        ok = False
    for text in (b'{"a":"' + data + b'"}', b'{"' + data + b'":1}'):
        assert is_done(feed(INITIAL, text)) == ok, text


TOKEN_BYTES = st.lists(st.sampled_from(list(b'{}[]":,0123456789.eE-+tfnrulas \\\n\x01\xc3\xa9x')),
                       min_size=1, max_size=5).map(bytes)


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.one_of(st.none(), TOKEN_BYTES), min_size=1, max_size=60),
       obj=OBJECTS, indent=st.sampled_from([None, 1]), memo=st.sampled_from([1, 4096]))
def test_masks_equal_brute_force(tokens, obj, indent, memo):
    vocab = JsonVocab(tokens, memo=memo)
    text = json.dumps(obj, indent=indent).encode()
    for i in range(len(text) + 1):                          # every state along one document
        state = feed(INITIAL, text[:i])
        for _ in range(2):                                  # a fresh mask, then the memo's
            mask, some = vocab.allowed(JSON_OBJECT, state)
            want = [bool(bs) and bool(feed(state, bs)) for bs in tokens]
            assert mask.tolist() == want, (text[:i], state)
            assert some == any(want)


# ----------------------------------------------------------------------------- the engine
class ByteTokenizer:
    """Ids 0-255 are the bytes, 256 is eos (special), 257 a special token: what JsonVocab and
    the engine need of a tokenizer."""
    eos_token_id = 256
    all_special_ids = [256, 257]

    def __len__(self):
        return 258

    def convert_ids_to_tokens(self, i):
        return f"<0x{i:02X}>" if i < 256 else ["</s>", "<x>"][i - 256]

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """The tiny llama shape with a vocabulary of 258 (the bytes, eos, one special)."""
    from helpers import make_checkpoint
    path = make_checkpoint(tmp_path_factory.mktemp("json-llama"), "llama", seed=3, vocab_size=258,
                           eos_token_id=256, bos_token_id=257)
    model, _ = flexkv.load_model(path, dtype=torch.float64)
    return model


def check_json_tokens(tokens: list[int], reason: str, params: SamplingParams | None = None):
    """The tokens are one JSON object (`reason` "stop") or the start of one ("length"); no
    structural whitespace run passes MAX_WS_RUN; once the object is complete, only stop tokens
    follow, unless `min_tokens` is not reached yet."""
    assert all(t < 256 for t in tokens), tokens        # no special token inside the object
    req = JsonRequest()
    for n, t in enumerate(tokens):
        assert req.ws_run <= MAX_WS_RUN
        assert not req.done or (params is not None and n < params.min_tokens), (n, tokens)
        assert req.advance(bytes([t])), bytes(tokens[:n + 1])
    data = bytes(tokens)
    if reason == "stop":
        assert req.done and loads_object(data.decode("utf-8", errors="replace")), data
    return req.state


@pytest.mark.parametrize("policy, kw", [("full", {}), ("h2o", dict(budget=12))])
@SETTINGS
@given(data=st.data())
def test_engine_json_requests_beside_plain_ones(tiny64, policy, kw, data):
    d = data.draw
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, ByteTokenizer(), policy, max_slots=d(st.integers(1, 3)), max_new_tokens=40,
                 max_prompt_tokens=30, prefill_chunk=8, **kw)
    reqs = []
    for i in range(d(st.integers(2, 5))):
        T, n = d(st.integers(2, 30)), d(st.integers(1, 40))
        json_mode = d(st.booleans())
        extra = {}
        if json_mode:
            # a push toward closing the object, so some requests finish it
            bias = d(st.sampled_from([None, {ord("}"): 5.0, ord('"'): 3.0, 256: 20.0}]))
            extra = dict(temperature=d(st.sampled_from([0.0, 1.0])), seed=i, logit_bias=bias,
                         min_tokens=d(st.integers(0, min(n, 3))),
                         presence_penalty=d(st.sampled_from([0.0, 1.0])))
        reqs.append((random_prompt(T, 100 + i, V), SamplingParams(
            max_tokens=n, response_format="json_object" if json_mode else "text", **extra)))
    handles = [eng.submit(p, sp) for p, sp in reqs]
    while eng.has_work():
        eng.step()
    for (prompt, sp), h in zip(reqs, handles):
        assert h.finish_reason in ("stop", "length")
        if sp.response_format == "json_object":
            check_json_tokens(h.tokens, h.finish_reason, sp)
            assert len(h.tokens) >= sp.min_tokens or h.finish_reason == "length"
        else:
            want, _ = solo(tiny64, prompt, sp.max_tokens, 8, policy, kw)
            n = len(h.tokens)
            assert h.tokens == want[:n] and (h.finish_reason == "stop" or n == sp.max_tokens)
    assert not eng._adjust.slots                          # every row neutral again


def test_a_finished_object_ends_with_eos_and_a_slot_is_fresh_after(tiny64):
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=1, max_new_tokens=40,
                 max_prompt_tokens=30, prefill_chunk=8)
    prompt = random_prompt(12, 5, V)
    # the bias makes `{"a":1}` the likeliest continuation at every point: then eos
    bias = {b: 40.0 for b in b'{}"a:1'} | {256: 60.0}
    h = eng.submit(prompt, SamplingParams(max_tokens=40, response_format="json_object",
                                          logit_bias=bias))
    while eng.has_work():
        eng.step()
    assert h.finish_reason == "stop"
    check_json_tokens(h.tokens, "stop")
    # the same request without JSON mode would stop at once (eos has the highest bias)
    plain = eng.generate([prompt], SamplingParams(max_tokens=40, logit_bias=bias))[0]
    assert plain == []
    # and a plain request in the slot afterwards equals generate alone
    assert eng.generate([prompt], SamplingParams(max_tokens=10))[0] == solo(tiny64, prompt, 10, 8, "full", {})[0]


def test_a_new_states_mask_is_computed_after_the_next_step_is_launched(tiny64):
    """A token's new recognizer state has its mask written when logits are next chosen from,
    after the engine has called the next decode step (on a GPU the host's walk then overlaps
    the step's kernels), never while the tokens are delivered; the tokens stay valid JSON."""
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=2, max_new_tokens=24,
                 max_prompt_tokens=30, prefill_chunk=8)
    events: list[str] = []
    step, deliver = eng._step_fn, eng._deliver
    eng._step_fn = lambda *a: (events.append("step"), step(*a))[1]
    eng._deliver = lambda *a: (events.append("deliver"), deliver(*a))[1]
    vocab = eng._json_vocab()
    allowed = vocab.allowed
    vocab.allowed = lambda *a: (events.append("mask"), allowed(*a))[1]
    h = eng.submit(random_prompt(12, 5, tiny64.args.vocab_size),
                   SamplingParams(max_tokens=24, response_format="json_object", seed=1,
                                  temperature=1.0))
    while eng.has_work():
        eng.step()
    check_json_tokens(h.tokens, h.finish_reason)
    assert events.count("step") >= 3 and events.count("mask") >= 3
    first = events.index("step")
    assert "mask" in events[:first]                       # the prompt's state, at admission
    for i, e in enumerate(events[first:], first):         # then: step, its masks, deliver
        if e == "mask":
            before = [x for x in events[:i] if x != "mask"]
            assert before[-1] == "step", events


def test_json_mode_needs_a_tokenizer_and_a_known_format(tiny64):
    eng = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=4, max_prompt_tokens=30)
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        eng.submit([1, 2], SamplingParams(max_tokens=4, response_format="json_object"))
    with pytest.raises(ValueError, match="response_format must be one of"):
        eng.submit([1, 2], SamplingParams(max_tokens=4, response_format="yaml"))



@pytest.fixture(scope="module")
def real_vocab():
    from test_server import _default_tokenizer_or_none
    tok = _default_tokenizer_or_none()
    if tok is None:
        pytest.skip("the default model is not provisioned here")
    return tok, JsonVocab.from_tokenizer(tok, len(tok))


@settings(max_examples=40, deadline=None)
@given(obj=OBJECTS, indent=st.sampled_from([None, 2]))
def test_a_real_tokenizers_own_tokens_of_json_are_allowed(real_vocab, obj, indent):
    """The default model's byte-level BPE tokenizer: however it splits a JSON document, each of
    its tokens is allowed where it comes, and the document ends complete."""
    tok, vocab = real_vocab
    doc = json.dumps(obj, indent=indent, ensure_ascii=False)
    ids = tok(doc, add_special_tokens=False)["input_ids"]
    # (the tokenizer has no token for some bytes, e.g. 0xF1: those documents it cannot write)
    assume(b"".join(vocab.bytes_of.get(t, b"?") for t in ids) == doc.encode())
    state = INITIAL
    for t in ids:
        assert vocab.allowed(JSON_OBJECT, state)[0][t], (doc, tok.decode([t]), state)
        state = feed(state, vocab.bytes_of[t])
    assert is_done(state)


def test_whitespace_runs_are_bounded_and_a_complete_object_ends(tiny64):
    """A model that prefers whitespace above all: after MAX_WS_RUN structural whitespace bytes
    the next token is something else; under `ignore_eos` (no stop token to end a complete
    object) whitespace follows the object until `max_tokens`."""
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=2, max_new_tokens=40,
                 max_prompt_tokens=30, prefill_chunk=8)
    prompt = random_prompt(6, 9, V)
    ws = {ord(" "): 90.0, ord("\n"): 90.0}
    h = eng.submit(prompt, SamplingParams(max_tokens=40, response_format="json_object", logit_bias=ws))
    close = ws | {ord("{"): 95.0, ord("}"): 95.0}
    g = eng.submit(prompt, SamplingParams(max_tokens=40, response_format="json_object",
                                          logit_bias=close, ignore_eos=True))
    while eng.has_work():
        eng.step()
    assert h.finish_reason == "length"
    assert all(t in ws for t in h.tokens[:MAX_WS_RUN]) and h.tokens[MAX_WS_RUN] == ord("{")
    check_json_tokens(h.tokens, "length")
    assert g.finish_reason == "length" and len(g.tokens) == 40
    end = bytes(g.tokens).index(b"}")
    assert bytes(g.tokens[:end + 1]).strip() == b"{}" and all(t in ws for t in g.tokens[end + 1:])
