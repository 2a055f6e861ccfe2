"""Structured output (`response_format` `json_object` or `json_schema`): the generated text is
one JSON value of a grammar (`flexkv.serve.json_schema`: JSON mode is the grammar of
`{"type": "object"}`).

A byte-level recognizer of RFC 8259 JSON restricted by the grammar. It reads bytes
nondeterministically (a schema's `anyOf` branches, a number that may end or go on, enum values
that share a start), so its state is a frozenset of threads `(mode, extra, stacks)`: what may
come next (`mode`; `extra` holds the value's node, a string's kind, length so far and pattern
states, a UTF-8 character's or a `\\u` escape's rest, a bounded integer's digits, or the
candidate keys / literal texts still matching) and the open containers it may be in (`stacks`).
The stacks are graph-structured, as a GLR parser's: a frozenset of stacks, each None (empty) or
`(top frame, {the stacks below it})`, frames `(bracket, node, n)` (n the next property's index
of an object, the items so far of an array). `step` makes the threads of one `(mode, extra)`
one thread on all their stacks, and the stacks of one top frame one node on all theirs, so
alternatives cost threads that add up, not multiply: alike branches through nested containers
stay one thread (they were 2^depth: a 3 KB schema could stall the engine), and 200 objects each
with a property of 200 alternatives cost a thread per live alternative, not per alternative and
object (111 against 22,200 after `{"p": "x1` in the test). Only a container's own bytes
(brackets, commas, keys) read a top frame, each stack's in turn. `step` advances a state by one
byte; an empty state is a dead end, and every live state can be finished. Strings hold
well-formed UTF-8 only, so the text always decodes.

`JsonVocab` knows every token's bytes and gives, per grammar and state, the tokens that may
follow (a `[V]` bool mask on the engine's device): a walk of the trie of the tokens' bytes,
pruned where the state dies; in a string, every token of whole plain characters that fits the
string's length limit is allowed without a walk. Masks are memoized, keyed by what a token can
see of each thread's stacks (their top `closers + 1` frames, each way below a fork, `closers`
the most closing brackets any one token holds, and whether they go deeper). The serving engine
(`flexkv.serve.penalties`) advances a request's state by each token it produces and bans the
tokens outside the mask before choosing. Its stop tokens (end of sequence) are allowed once the
value is complete, beside what may still continue it (a top-level number's digits; nothing
after an object: whitespace only while no stop token may be chosen: none under `ignore_eos`, or
`min_tokens` not reached). Outside strings, whitespace tokens are banned after `MAX_WS_RUN`
whitespace bytes in a row (a model in JSON mode can otherwise emit newlines forever).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import torch
from torch import Tensor

from flexkv.serve.json_schema import JSON_OBJECT, Arr, Grammar, Lit, Num, Obj, Str, Union

WS = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ESCAPED = {ord(k): ord(v) for k, v in zip('"\\/bfnrt', '"\\/\b\f\n\r\t')}   # the character
QUOTE, BACKSLASH, COMMA = ord('"'), ord("\\"), ord(",")

# modes: what may come next
(VALUE, ARRAY_FIRST, KEY_FIRST, KEY, COLON, AFTER, DONE,                  # structure
 KEYNAME, STRING, ESCAPE, UNICODE, LITERAL,                               # strings, literals
 MINUS, ZERO, INT, DOT, FRAC, EXP_MARK, EXP_SIGN, EXP) = range(20)        # numbers
NUMBER_ENDS = frozenset({ZERO, INT, FRAC, EXP})   # a number may end here
IN_TEXT = frozenset({KEYNAME, STRING, ESCAPE, UNICODE, LITERAL})   # whitespace there is text
MAP_KEY = -1        # a STRING's kind for a key of an object without properties (else its Str node)
MAX_WS_RUN = 32     # structural whitespace bytes in a row, after which whitespace tokens are banned
MEMO_BYTES = 256 << 20   # JsonVocab's masks on the device ([V] bool each), at most
# a UTF-8 lead byte -> (the bytes still to come, the range of the next one) (Unicode's table 3-7)
UTF8_LEAD = ({b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}
             | {b: (2, 0x80, 0xBF) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}
             | {0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F)}
             | {b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}
             | {0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)})


BOTTOM = frozenset({None})      # the stacks of a top-level value: the empty one


def initial(g: Grammar) -> frozenset:
    return frozenset({(VALUE, g.root, BOTTOM)})


def is_done(state: frozenset) -> bool:
    """The text so far is a whole value (it may also go on: a top-level number)."""
    return any(t[0] == DONE for t in state)


def _push(stacks: frozenset, frame: tuple) -> frozenset:
    """A container opens on each of `stacks`: one node, on all of them."""
    return frozenset(((frame, stacks),))


def _retop(stack: tuple, frame: tuple) -> frozenset:
    """The stack with its top frame replaced."""
    return frozenset(((frame, stack[1]),))


def _end(stacks: frozenset) -> list:
    """The threads after a value ends, inside the containers of each of `stacks`."""
    inside = stacks - BOTTOM
    return ([(DONE, None, BOTTOM)] if None in stacks else []) + ([(AFTER, None, inside)] if inside else [])


def _close(stack: tuple) -> list:
    """The threads after the container at the top of `stack` closes."""
    return _end(stack[1])


def _number(mode: int, integer: bool, b: int) -> int | None:
    digit = b in DIGITS
    if mode == MINUS:
        return ZERO if b == ord("0") else INT if digit else None
    if digit and mode in (INT, DOT, FRAC):
        return INT if mode == INT else FRAC
    if integer:
        return None
    if mode in (ZERO, INT) and b == ord("."):
        return DOT
    if mode in (ZERO, INT, FRAC) and b in b"eE":
        return EXP_MARK
    if mode == EXP_MARK and b in b"+-":
        return EXP_SIGN
    if mode in (EXP_MARK, EXP_SIGN, EXP) and digit:
        return EXP
    return None


def _in_number(g: Grammar, mode: int, extra: tuple, stacks: frozenset) -> list:
    """A number's thread (extra: its node, and a bounded integer's text so far, else None), and
    where it may end, the thread after it; none where a bounded integer cannot meet its bounds."""
    i, text = extra
    if text is not None and not _may_reach(g.nodes[i], text):
        return []
    t = (mode, extra, stacks)
    ends = mode in NUMBER_ENDS and (text is None or _within(g.nodes[i], int(text)))
    return [t, *_end(stacks)] if ends else [t]


def _bounds(node: Num) -> tuple:
    return (-math.inf if node.lo is None else node.lo), (math.inf if node.hi is None else node.hi)


def _within(node: Num, value: int) -> bool:
    lo, hi = _bounds(node)
    return lo <= value <= hi


def _may_reach(node: Num, text: str) -> bool:
    """Some integer from node.lo to node.hi begins with `text` ("-", "-12", "0", "345", ...)."""
    lo, hi = _bounds(node)
    neg, digits = text.startswith("-"), text.lstrip("-")
    if not digits:                      # "-": any integer <= 0
        return lo <= min(0, hi)
    if digits == "0":                   # "0", "-0": just 0
        return lo <= 0 <= hi
    p, k = int(digits), 1
    while True:                         # with more digits: p * k ... (p + 1) * k - 1, k = 10^n
        a, b = p * k, (p + 1) * k - 1
        if neg:
            a, b = -b, -a
        if max(a, lo) <= min(b, hi):
            return True
        if (b < lo) if neg else (a > hi):   # every longer one is further out
            return False
        k *= 10


def _literal(texts, b: int, stacks: frozenset) -> list:
    rests = [t[1:] for t in texts if t[0] == b]
    more = frozenset(r for r in rests if r)
    out = [(LITERAL, more, stacks)] if more else []
    return out + _end(stacks) if b"" in rests else out


def _start(g: Grammar, i: int, b: int, stacks: frozenset) -> list:
    """The threads after a value of node `i` begins with byte `b`."""
    node = g.nodes[i]
    if isinstance(node, Union):
        return [t for o in node.options for t in _start(g, o, b, stacks)]
    if isinstance(node, Obj):
        return [(KEY_FIRST, None, _push(stacks, ("{", i, 0)))] if b == ord("{") else []
    if isinstance(node, Arr):
        return [(ARRAY_FIRST, None, _push(stacks, ("[", i, 0)))] if b == ord("[") else []
    if isinstance(node, Str):
        rx = None if node.pattern is None else node.pattern.start
        return [(STRING, (i, 0 if node.counted else None, None, rx), stacks)] if b == QUOTE else []
    if isinstance(node, Num):
        if b != ord("-") and b not in DIGITS:
            return []
        mode = MINUS if b == ord("-") else ZERO if b == ord("0") else INT
        return _in_number(g, mode, (i, chr(b) if node.bounded else None), stacks)
    assert isinstance(node, Lit)
    return _literal(node.texts, b, stacks)


def _char(g: Grammar, kind: int, count):
    """A string's length after one more character (counted up to its node's cap)."""
    return None if count is None else min(count + 1, g.nodes[kind].cap)


def _took(g: Grammar, kind: int, count, rx, cp: int, stacks: frozenset) -> list:
    """A string after a character `cp` that ends an escape or a UTF-8 sequence, or one byte."""
    if rx is not None:
        rx = g.nodes[kind].pattern.step(rx, cp)
        if not rx:
            return []
    return [(STRING, (kind, count, None, rx), stacks)]


def _string(g: Grammar, mode: int, extra, stacks: frozenset, b: int) -> list:
    """STRING, ESCAPE and UNICODE threads. extra: the string's kind, its characters so far (None:
    not counted), the pattern's NFA states (None: no pattern), and for STRING the bytes a UTF-8
    character still needs (None, or (how many, the next one's range, the code point's bits so far
    where a pattern reads it)), for UNICODE the hex digits left and the value so far (where
    tracked: a pattern's string, or a counted one's lead digit, to refuse surrogates)."""
    if mode == ESCAPE:
        kind, count, rx = extra
        if b == ord("u"):
            tracked = count is not None or rx is not None
            return [(UNICODE, (kind, count, rx, 4, 0 if tracked else None), stacks)]
        if b not in ESCAPED:
            return []
        return _took(g, kind, _char(g, kind, count), rx, ESCAPED[b], stacks)
    if mode == UNICODE:
        kind, count, rx, left, v = extra
        if b not in HEX:
            return []
        left -= 1
        if v is not None:       # the code points it may still be: v * span ... + span - 1
            v, span = v * 16 + int(chr(b), 16), 16 ** left
            if 0xD800 <= v * span and v * span + span - 1 <= 0xDFFF:
                return []       # a surrogate: a tracked string's escape is one character
            if rx is not None and not g.nodes[kind].pattern.may_take(rx, v * span, v * span + span - 1):
                return []
            if rx is None:      # a counted string only needs to know a lead d
                v = v if v == 0xD else 0
        if left:
            return [(UNICODE, (kind, count, rx, left, v), stacks)]
        return _took(g, kind, _char(g, kind, count), rx, v, stacks)
    kind, count, utf, rx = extra
    if utf is not None:         # inside a UTF-8 character: its next byte, in range
        left, lo, hi, v = utf
        if not lo <= b <= hi:
            return []
        left -= 1
        if v is not None:       # (a pattern reads the code point)
            v = (v << 6) | (b & 0x3F)
            if not left:
                return _took(g, kind, count, rx, v, stacks)
            if not g.nodes[kind].pattern.may_take(rx, v << 6 * left, ((v + 1) << 6 * left) - 1):
                return []
        return [(STRING, (kind, count, (left, 0x80, 0xBF, v) if left else None, rx), stacks)]
    if b == QUOTE:
        if kind == MAP_KEY:
            return [(COLON, g.nodes[s[0][1]].values, frozenset((s,))) for s in stacks]
        if rx is not None and not g.nodes[kind].pattern.accepts(rx):
            return []
        return _end(stacks) if count is None or count >= g.nodes[kind].min else []
    if b < 0x20:
        return []
    if count is not None:       # a character begins
        limit = g.nodes[kind].max
        if limit is not None and count >= limit:
            return []
        if b != BACKSLASH:      # (an escape counts when it ends)
            count = _char(g, kind, count)
    if b == BACKSLASH:
        return [(ESCAPE, (kind, count, rx), stacks)]
    if b < 0x80:
        return _took(g, kind, count, rx, b, stacks)
    lead = UTF8_LEAD.get(b)     # well-formed UTF-8 only (as `bytes.decode` takes it)
    if lead is None:
        return []
    n, lo, hi = lead
    v = None
    if rx is not None:          # the code points the sequence may still be
        v, rest = b & (0x3F >> n), 6 * (n - 1)
        first = (v << 6 * n) | ((lo & 0x3F) << rest)
        last = (v << 6 * n) | ((hi & 0x3F) << rest) | ((1 << rest) - 1)
        if not g.nodes[kind].pattern.may_take(rx, first, last):
            return []
    return [(STRING, (kind, count, (n, lo, hi, v), rx), stacks)]


def _container(g: Grammar, mode: int, stack: tuple, b: int) -> list:
    """ARRAY_FIRST, KEY_FIRST, KEY and AFTER threads: the top frame's brackets, commas and keys."""
    tag, i, n = stack[0]
    node = g.nodes[i]
    if tag == "[":
        if b == ord("]") and mode in (ARRAY_FIRST, AFTER) and n >= node.min:
            return _close(stack)
        if node.max is not None and n >= node.max:
            return []
        if mode == ARRAY_FIRST:
            return _start(g, node.item(0), b, _retop(stack, ("[", i, min(1, node.cap))))
        if mode == AFTER and b == COMMA:
            return [(VALUE, node.item(n), _retop(stack, ("[", i, min(n + 1, node.cap))))]
        return []
    if b == ord("}") and mode in (KEY_FIRST, AFTER) and not node.need[n]:
        return _close(stack)
    if b == COMMA and mode == AFTER and (node.nexts[n] if node.props else node.values is not None):
        return [(KEY, None, frozenset((stack,)))]
    if b == QUOTE and mode in (KEY_FIRST, KEY):
        if node.props:
            keys = frozenset((node.props[j][0][1:], j) for j in node.nexts[n])
            return [(KEYNAME, keys, frozenset((stack,)))] if keys else []
        return ([(STRING, (MAP_KEY, None, None, None), frozenset((stack,)))]
                if node.values is not None else [])
    return []


def _step(g: Grammar, thread: tuple, b: int) -> list:
    mode, extra, stacks = thread
    if mode in (STRING, ESCAPE, UNICODE):
        return _string(g, mode, extra, stacks, b)
    if mode == KEYNAME:         # extra: {(the key's bytes still to come, its index)}
        rests = [(r[1:], j) for r, j in extra if r[0] == b]
        for r, j in rests:
            if not r:           # the key is complete (its closing quote): its value follows
                return [(COLON, g.nodes[s[0][1]].props[j][1], _retop(s, ("{", s[0][1], j + 1)))
                        for s in stacks]
        return [(KEYNAME, frozenset(rests), stacks)] if rests else []
    if mode == LITERAL:         # extra: {the texts' bytes still to come}
        return _literal(extra, b, stacks)
    if mode >= MINUS:           # extra: the number's node, a bounded integer's text so far
        i, text = extra
        nxt = _number(mode, g.nodes[i].integer, b)
        if nxt is None:
            return []
        return _in_number(g, nxt, (i, None if text is None else text + chr(b)), stacks)
    if b in WS:
        return [thread]
    if mode == VALUE:
        return _start(g, extra, b, stacks)
    if mode == COLON:
        return [(VALUE, extra, stacks)] if b == ord(":") else []
    return [] if mode == DONE else [t for s in stacks for t in _container(g, mode, s, b)]


def step(g: Grammar, state: frozenset, b: int) -> frozenset:
    """The state after byte `b` (empty where `b` cannot follow). The threads of one `(mode,
    extra)` become one, on all their stacks (`_by_frame`)."""
    out = [t for thread in state for t in _step(g, thread, b)]
    if len(out) < 2:
        return frozenset(out)
    merged: dict[tuple, frozenset] = {}
    for mode, extra, stacks in out:
        seen = merged.get((mode, extra))
        merged[mode, extra] = stacks if seen is None or seen is stacks else seen | stacks
    return frozenset((mode, extra, _by_frame(stacks)) for (mode, extra), stacks in merged.items())


def _by_frame(stacks: frozenset) -> frozenset:
    """`stacks` with those of one top frame as one node, on all the stacks below them (below it,
    alike frames merge in turn when they come to the top)."""
    if len(stacks) < 2:
        return stacks
    below: dict = {}
    for s in stacks:
        if s is None:
            below[None] = None
        else:
            seen = below.get(s[0])
            below[s[0]] = s[1] if seen is None else seen | s[1]
    if len(below) == len(stacks):
        return stacks
    return frozenset(None if f is None else (f, under) for f, under in below.items())


def feed(g: Grammar, state: frozenset, data: bytes) -> frozenset:
    """The state after `data` (empty where some byte cannot follow)."""
    for b in data:
        if not state:
            break
        state = step(g, state, b)
    return state


def _plain_chars(data: bytes) -> int:
    """How many characters `data` holds if it is whole plain string characters (none a quote, a
    backslash or a control character), else -1."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return -1
    return len(text) if all(b >= 0x20 and b != QUOTE and b != BACKSLASH for b in data) else -1


def _string_room(g: Grammar, state: frozenset):
    """Where every thread is in a string between characters: the most plain characters one of
    them may still take (inf where its length is not limited); else None."""
    room = None
    for mode, extra, _ in state:
        if mode != STRING or extra[2:] != (None, None):     # in a character, or a pattern
            return None
        kind, count = extra[:2]
        limit = None if count is None else g.nodes[kind].max
        r = float("inf") if limit is None else limit - count
        room = r if room is None else max(room, r)
    return room


class JsonRequest:
    """One request's recognizer: its grammar, its state, the run of structural whitespace bytes
    (outside strings) its text ends with (models in JSON mode can otherwise emit newlines
    forever), and the engine's seconds spent on it (`flexkv.serve.penalties` bounds them)."""

    def __init__(self, grammar: Grammar = JSON_OBJECT):
        self.grammar, self.state, self.ws_run = grammar, initial(grammar), 0
        self.seconds = 0.0      # the engine's time on this request's states and masks so far

    @property
    def done(self) -> bool:
        return is_done(self.state)

    @property
    def open_threads(self) -> frozenset:
        """The state without its finished threads: what may still continue the value."""
        return frozenset(t for t in self.state if t[0] != DONE)

    def advance(self, data: bytes) -> bool:
        """Take a token's bytes (False, and no change, where they cannot follow)."""
        state, run = self.state, self.ws_run
        for b in data:
            text = any(t[0] in IN_TEXT for t in state)
            state = step(self.grammar, state, b)
            if not state:
                return False
            run = run + 1 if b in WS and not text else 0
        self.state, self.ws_run = state, run
        return True


class JsonVocab:
    """The tokens that may follow each grammar's states, as `[V]` bool masks on `device`.

    `token_bytes[i]`: token i's bytes, or None for a token that never appears in JSON text
    (special tokens, a piece of a character whose bytes are unknown, ids the tokenizer lacks)."""

    def __init__(self, token_bytes: list, device="cpu", memo: int | None = None):
        start = time.perf_counter()
        self.V, self.device = len(token_bytes), torch.device(device)
        # masks kept (least recently used out): by default as many as MEMO_BYTES hold
        self.memo_size = max(64, MEMO_BYTES // max(1, self.V)) if memo is None else memo
        self.tokens = [(i, bytes(bs)) for i, bs in enumerate(token_bytes) if bs]
        self.bytes_of = dict(self.tokens)
        # a trie of every token's bytes (node: [{byte: child}, [ids ending here]]), and one of
        # the tokens that are not whole plain string characters (plain_chars: how many the
        # others hold), each walked once per state, pruned where the state dies
        self.trie, self.string_other = [{}, []], [{}, []]
        self.plain_chars = torch.full((self.V,), 2**30, dtype=torch.int32)
        ws_first = []
        for i, bs in self.tokens:
            chars = _plain_chars(bs)
            for trie in (self.trie,) if chars >= 0 else (self.trie, self.string_other):
                node = trie
                for b in bs:
                    node = node[0].setdefault(b, [{}, []])
                node[1].append(i)
            if chars >= 0:
                self.plain_chars[i] = chars
            if bs[0] in WS:
                ws_first.append(i)
        ws_start = torch.zeros(self.V, dtype=torch.bool)
        ws_start[ws_first] = True
        self.ws_start = ws_start.to(self.device)   # tokens that begin with whitespace
        # the most closing brackets one token holds: a mask depends on that many stack entries
        # (plus the one it then reads) and on whether the stack is deeper
        self.closers = max((bs.count(b"}") + bs.count(b"]") for _, bs in self.tokens), default=0)
        self._memo: OrderedDict[tuple, tuple[Tensor, bool]] = OrderedDict()
        # what the masks cost (the engine's metrics): masks computed, seconds (the tables' build
        # included), all on the engine's thread
        self.masks_computed, self.seconds = 0, time.perf_counter() - start

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, device="cpu") -> "JsonVocab":
        """Every id below `vocab_size`: its exact bytes (`TokenPieces.bytes`: byte-level BPE,
        `<0xNN>` byte fallback, else the text's UTF-8), None for special tokens and for ids the
        tokenizer does not have."""
        from flexkv.serve.detokenize import TokenPieces
        pieces = TokenPieces(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        n = min(vocab_size, len(tokenizer))
        return cls([None if i in special or i >= n else pieces.bytes(i) for i in range(vocab_size)],
                   device)

    @property
    def masks_kept(self) -> int:
        return len(self._memo)

    def _key(self, g: Grammar, state: frozenset) -> tuple:
        seen: dict[tuple, frozenset] = {}

        def view(stacks: frozenset, k: int) -> frozenset:
            """What a token can see of `stacks`: of each, its top k frames (where it forks, each
            way below), and whether it goes on below them."""
            hit = seen.get((id(stacks), k))
            if hit is None:
                hit = seen[id(stacks), k] = frozenset(top(s, k) for s in stacks)
            return hit

        def top(stack, k: int) -> tuple:
            frames = []
            while k and stack is not None and len(stack[1]) == 1:
                frames.append(stack[0])
                (stack,) = stack[1]
                k -= 1
            if not k or stack is None:
                return tuple(frames), stack is not None
            return tuple(frames), stack[0], view(stack[1], k - 1)
        k = self.closers + 1
        return g, frozenset((mode, extra, view(stacks, k)) for mode, extra, stacks in state)

    def allowed(self, g: Grammar, state: frozenset) -> tuple[Tensor, bool]:
        """([V] bool on the device: the tokens whose bytes may follow `state` of grammar `g`,
        whether there is any), memoized."""
        key = self._key(g, state)
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        start = time.perf_counter()
        # inside strings, between characters: a token of whole plain characters is allowed where
        # some thread has room for them; the others are found by walking the trie
        room = _string_room(g, state)
        if room is None:
            mask, trie = torch.zeros(self.V, dtype=torch.bool), self.trie
        else:
            mask, trie = self.plain_chars <= min(room, 2**29), self.string_other
        ok, todo, steps = [], [(trie, state)], {}   # steps: (state, byte) -> state, this walk's
        while todo:
            (children, _), at = todo.pop()
            for b, child in children.items():
                after = steps.get((at, b))
                if after is None:
                    after = steps[at, b] = step(g, at, b)
                if after:
                    ok += child[1]
                    if child[0]:
                        todo.append((child, after))
        mask[ok] = True
        hit = self._memo[key] = (mask.to(self.device), bool(mask.any()))
        if len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        self.masks_computed += 1
        self.seconds += time.perf_counter() - start
        return hit
