"""JSON mode (`response_format: {"type": "json_object"}`): the generated text is one JSON object.

A byte-level recognizer of RFC 8259 JSON whose top-level value is an object (whitespace around
it allowed). Its state is a tuple `(mode, extra, stack)`: what may come next (`mode`; `extra`
holds a string's kind, the hex digits left of a `\\u` escape, or the rest of `true` / `false` /
`null`) and the open containers (`stack`, e.g. `"{[{"`). `step` advances it by one byte and
returns None where the byte cannot follow.

`JsonVocab` knows every token's bytes and gives, per state, the tokens that may follow (a
`[V]` bool mask on the engine's device): only the tokens whose first byte can follow are
simulated, and in a string every token made of plain string bytes is allowed without
simulation; masks are memoized per state, keyed by what a token can see of the stack (its top
`closers + 1` entries, `closers` the most closing brackets any one token holds). The serving
engine (`flexkv.serve.penalties`) advances a request's state by each token it produces and bans
the tokens outside the mask before choosing. Its stop tokens (end of sequence) are allowed only
once the object is complete, and then nothing else (whitespace only while no stop token may be
chosen: none under `ignore_eos`, or `min_tokens` not reached). Outside strings, whitespace
tokens are banned after `MAX_WS_RUN` whitespace bytes in a row (a model in JSON mode can
otherwise emit newlines forever).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

WS = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ESCAPES = frozenset(b'"\\/bfnrt')
QUOTE, BACKSLASH = ord('"'), ord("\\")

# modes: what may come next
(START, VALUE, ARRAY_FIRST, KEY_FIRST, KEY, COLON, AFTER, DONE,            # structure
 STRING, ESCAPE, UNICODE, LITERAL,                                        # strings, literals
 MINUS, ZERO, INT, DOT, FRAC, EXP_MARK, EXP_SIGN, EXP) = range(20)        # numbers
NUMBER_ENDS = frozenset({ZERO, INT, FRAC, EXP})   # a number may end here
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

INITIAL = (START, None, "")
MAX_WS_RUN = 32   # structural whitespace bytes in a row, after which whitespace tokens are banned


def _after_value(stack: str) -> tuple:
    return (AFTER, None, stack) if stack else (DONE, None, "")


def _number(mode: int, b: int) -> int | None:
    digit = b in DIGITS
    if mode == MINUS:
        return ZERO if b == ord("0") else INT if digit else None
    if digit and mode in (INT, DOT, FRAC):
        return INT if mode == INT else FRAC
    if mode in (ZERO, INT) and b == ord("."):
        return DOT
    if mode in (ZERO, INT, FRAC) and b in b"eE":
        return EXP_MARK
    if mode == EXP_MARK and b in b"+-":
        return EXP_SIGN
    if mode in (EXP_MARK, EXP_SIGN, EXP) and digit:
        return EXP
    return None


def _value_start(b: int, stack: str) -> tuple | None:
    if b == ord("{"):
        return (KEY_FIRST, None, stack + "{")
    if b == ord("["):
        return (ARRAY_FIRST, None, stack + "[")
    if b == QUOTE:
        return (STRING, False, stack)
    if b == ord("-"):
        return (MINUS, None, stack)
    if b in DIGITS:
        return (ZERO if b == ord("0") else INT, None, stack)
    if b in LITERALS:
        return (LITERAL, LITERALS[b], stack)
    return None


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte `b`, or None where `b` cannot follow."""
    mode, extra, stack = state
    if mode == STRING:          # extra: a key's string (True) or a value's
        if b == QUOTE:
            return (COLON, None, stack) if extra else _after_value(stack)
        if b == BACKSLASH:
            return (ESCAPE, extra, stack)
        return None if b < 0x20 else state
    if mode == ESCAPE:
        if b == ord("u"):
            return (UNICODE, (extra, 4), stack)
        return (STRING, extra, stack) if b in ESCAPES else None
    if mode == UNICODE:         # extra: (the string's kind, hex digits left)
        if b not in HEX:
            return None
        kind, left = extra
        return (STRING, kind, stack) if left == 1 else (UNICODE, (kind, left - 1), stack)
    if mode == LITERAL:         # extra: the literal's bytes still to come
        if b != extra[0]:
            return None
        return (LITERAL, extra[1:], stack) if len(extra) > 1 else _after_value(stack)
    if mode >= MINUS:
        nxt = _number(mode, b)
        if nxt is not None:
            return (nxt, None, stack)
        return step(_after_value(stack), b) if mode in NUMBER_ENDS else None
    if b in WS:
        return state
    if mode == START:
        return (KEY_FIRST, None, "{") if b == ord("{") else None
    if mode in (VALUE, ARRAY_FIRST):
        if mode == ARRAY_FIRST and b == ord("]"):
            return _after_value(stack[:-1])
        return _value_start(b, stack)
    if mode in (KEY_FIRST, KEY):
        if mode == KEY_FIRST and b == ord("}"):
            return _after_value(stack[:-1])
        return (STRING, True, stack) if b == QUOTE else None
    if mode == COLON:
        return (VALUE, None, stack) if b == ord(":") else None
    if mode == AFTER:
        if b == ord(","):
            return (KEY, None, stack) if stack[-1] == "{" else (VALUE, None, stack)
        if b == ord("}" if stack[-1] == "{" else "]"):
            return _after_value(stack[:-1])
    return None                 # DONE: only whitespace


def feed(state: tuple | None, data: bytes) -> tuple | None:
    """The state after `data` (None where some byte cannot follow)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_plain_string_byte(b: int) -> bool:
    return b >= 0x20 and b != QUOTE and b != BACKSLASH


class JsonRequest:
    """One request's recognizer: its state and the run of structural whitespace bytes (outside
    strings) its text ends with (models in JSON mode can otherwise emit newlines forever)."""

    def __init__(self):
        self.state, self.ws_run = INITIAL, 0

    @property
    def done(self) -> bool:
        return self.state[0] == DONE

    def advance(self, data: bytes) -> bool:
        """Take a token's bytes (False, and no change, where they cannot follow)."""
        state, run = self.state, self.ws_run
        for b in data:
            mode = state[0]
            state = step(state, b)
            if state is None:
                return False
            run = run + 1 if b in WS and mode not in (STRING, ESCAPE, UNICODE) else 0
        self.state, self.ws_run = state, run
        return True


class JsonVocab:
    """The tokens that may follow each recognizer state, as `[V]` bool masks on `device`.

    `token_bytes[i]`: token i's bytes, or None for a token that never appears in JSON text
    (special tokens, a piece of a character whose bytes are unknown, ids the tokenizer lacks)."""

    def __init__(self, token_bytes: list, device="cpu", memo: int = 4096):
        self.V, self.device, self.memo_size = len(token_bytes), torch.device(device), memo
        self.tokens = [(i, bytes(bs)) for i, bs in enumerate(token_bytes) if bs]
        self.bytes_of = dict(self.tokens)
        self.by_first: dict[int, list] = {}      # first byte -> [(id, bytes)]
        self.string_other: dict[int, list] = {}  # the same, for tokens a string cannot take whole
        plain, ws_first = [], []
        for i, bs in self.tokens:
            self.by_first.setdefault(bs[0], []).append((i, bs))
            if all(is_plain_string_byte(b) for b in bs):
                plain.append(i)
            else:
                self.string_other.setdefault(bs[0], []).append((i, bs))
            if bs[0] in WS:
                ws_first.append(i)
        self.string_plain = torch.zeros(self.V, dtype=torch.bool)
        self.string_plain[plain] = True
        ws_start = torch.zeros(self.V, dtype=torch.bool)
        ws_start[ws_first] = True
        self.ws_start = ws_start.to(self.device)   # tokens that begin with whitespace
        # the most closing brackets one token holds: a mask depends on that many stack entries
        # (plus the one it then reads) and on whether the stack is deeper
        self.closers = max((bs.count(b"}") + bs.count(b"]") for _, bs in self.tokens), default=0)
        self._memo: OrderedDict[tuple, tuple[Tensor, bool]] = OrderedDict()

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

    def _key(self, state: tuple) -> tuple:
        mode, extra, stack = state
        k = self.closers + 1
        return (mode, extra, stack[-k:], len(stack) > k)

    def allowed(self, state: tuple) -> tuple[Tensor, bool]:
        """([V] bool on the device: the tokens whose bytes may follow `state`, whether there is
        any), memoized."""
        key = self._key(state)
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        mask = self.string_plain.clone() if state[0] == STRING else torch.zeros(self.V, dtype=torch.bool)
        table = self.string_other if state[0] == STRING else self.by_first
        ok = [i for b in range(256) if b in table and step(state, b) is not None
              for i, bs in table[b] if feed(state, bs) is not None]
        mask[ok] = True
        hit = self._memo[key] = (mask.to(self.device), bool(mask.any()))
        if len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return hit
