"""JSON Schema's `pattern` (an ECMA-262 regular expression, unanchored) as an NFA over code points.

`compile_pattern(text)` parses the subset that schemas use: literals, `.`, classes `[a-z]` /
`[^...]`, escapes (`\\d \\D \\w \\W \\s \\S`, `\\t \\n \\r \\f \\v \\0`, `\\xHH`, `\\uHHHH`,
`\\` before punctuation), groups `(...)`, `(?:...)`, `(?<name>...)`, alternation `|`, quantifiers
`* + ? {n} {n,} {n,m}` (greedy or lazy: the same language), and `^` / `$` at the very start /
end. A pattern matches anywhere in the string unless anchored, as JSON Schema has it. Anything
else (backreferences, lookaround, `\\b`, anchors elsewhere, Unicode property escapes) is a
ValueError that names it.

The NFA (Thompson's construction) is trimmed to the states from which the end can still be
reached, and its classes hold no surrogate code points (a JSON string's characters here are
code points), so a non-empty state set can always be completed. `Regex.step(states, cp)` reads
one code point; `Regex.may_take(states, lo, hi)` says whether some code point in [lo, hi] can
be read next (so a partly written character never leads to a dead end).
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

MAX_CP = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
MAX_STATES = 4096
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
         (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
LINE_ENDS = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
SIMPLE_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


def _norm(ranges) -> tuple:
    """Sorted, merged, without surrogates."""
    out = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
    return tuple(out)


def _negate(ranges) -> tuple:
    out, at = [], 0
    for lo, hi in _norm(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= MAX_CP:
        out.append((at, MAX_CP))
    return _norm(out)


ANY = _norm([(0, MAX_CP)])


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def fail(self, msg: str):
        raise ValueError(f"pattern {self.s!r} at {self.i}: {msg}")

    def peek(self) -> str | None:
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self) -> str:
        c = self.peek()
        if c is None:
            self.fail("the pattern ends early")
        self.i += 1
        return c

    def alt(self):
        alts = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.seq())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def seq(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            if self.peek() in "^$":
                self.fail(f"{self.peek()!r} is supported only at the very start / end of the pattern")
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("cat", items)

    def quantified(self, atom):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (counted := self._counted()):
            lo, hi = counted
            self.i = self.s.index("}", self.i) + 1
        else:
            return atom
        if self.peek() == "?":          # lazy: the same language
            self.i += 1
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self._counted()):
            self.fail("a quantifier after a quantifier")
        return ("rep", atom, lo, hi)

    def _counted(self):
        """(lo, hi) of a `{n}`, `{n,}` or `{n,m}` here, else None (then `{` is a literal)."""
        end = self.s.find("}", self.i)
        if end < 0:
            return None
        body = self.s[self.i + 1:end]
        lo, comma, hi = body.partition(",")
        if not (lo.isascii() and lo.isdigit()) or not (hi == "" or (hi.isascii() and hi.isdigit())):
            return None
        lo, hi = int(lo), (int(hi) if hi else None) if comma else int(lo)
        if hi is not None and hi < lo:
            self.fail(f"{{{body}}}: the maximum is below the minimum")
        return lo, hi

    def atom(self):
        c = self.take()
        if c == "(":
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.s.startswith("?<", self.i) and self.s[self.i + 2:self.i + 3] not in ("=", "!"):
                self.i = self.s.index(">", self.i) + 1
            elif self.peek() == "?":
                self.fail("lookaround and other (?...) groups are not supported")
            inner = self.alt()
            if self.take() != ")":
                self.fail("an unclosed group")
            return inner
        if c == ")":
            self.fail("an unmatched ')'")
        if c == "[":
            return ("chars", self.char_class())
        if c == ".":
            return ("chars", _negate(LINE_ENDS))
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c in "*+?":
            self.fail(f"nothing to repeat before {c!r}")
        return ("chars", _norm([(ord(c), ord(c))]))

    def escape(self, in_class: bool) -> tuple:
        c = self.take()
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c.lower() in classes:
            r = classes[c.lower()]
            return _norm(r) if c.islower() else _negate(r)
        if c in SIMPLE_ESCAPES and not (c == "0" and (self.peek() or "").isdigit()):
            return _norm([(SIMPLE_ESCAPES[c], SIMPLE_ESCAPES[c])])
        if c == "b" and in_class:
            return _norm([(8, 8)])
        for mark, n in (("x", 2), ("u", 4)):
            if c == mark:
                digits = self.s[self.i:self.i + n]
                if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    self.fail(f"\\{mark} needs {n} hex digits")
                self.i += n
                cp = int(digits, 16)
                return _norm([(cp, cp)])
        if c.isalnum():
            self.fail(f"the escape \\{c} is not supported")
        return _norm([(ord(c), ord(c))])

    def char_class(self) -> tuple:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges, first = [], True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            lo = self.escape(in_class=True) if c == "\\" else _norm([(ord(c), ord(c))])
            if self.peek() == "-" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                d = self.take()
                hi = self.escape(in_class=True) if d == "\\" else _norm([(ord(d), ord(d))])
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    self.fail("a range's ends must be single characters")
                if hi[0][0] < lo[0][0]:
                    self.fail("a range out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges += lo
        return _negate(ranges) if negate else _norm(ranges)


@dataclass(eq=False)
class Regex:
    """An NFA: `edges[s]` = ((ranges, next state), ...), `start` the closed start set, `accept`
    the accepting state; states that cannot reach it are gone."""
    text: str
    edges: list = field(default_factory=list)
    eps: list = field(default_factory=list)
    accept: int = 0
    start: frozenset = frozenset()

    def __post_init__(self):
        self._step = lru_cache(maxsize=4096)(self._step_uncached)   # (states, code point) -> states

    def __repr__(self):
        return f"Regex({self.text!r})"

    def closure(self, states) -> frozenset:
        seen = set(states)
        todo = list(seen)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _step_uncached(self, states: frozenset, cp: int) -> frozenset:
        return self.closure(t for s in states for ranges, t in self.edges[s] if _has(ranges, cp))

    def step(self, states: frozenset, cp: int) -> frozenset:
        return self._step(states, cp)

    def may_take(self, states: frozenset, lo: int, hi: int) -> bool:
        return any(_meets(ranges, lo, hi) for s in states for ranges, _ in self.edges[s])

    def accepts(self, states: frozenset) -> bool:
        return self.accept in states


def _has(ranges: tuple, cp: int) -> bool:
    i = bisect_right(ranges, (cp, MAX_CP + 1)) - 1
    return i >= 0 and ranges[i][0] <= cp <= ranges[i][1]


def _meets(ranges: tuple, lo: int, hi: int) -> bool:
    return any(a <= hi and lo <= b for a, b in ranges)


class _Builder:
    def __init__(self):
        self.edges, self.eps = [], []

    def new(self) -> int:
        if len(self.edges) >= MAX_STATES:
            raise ValueError(f"pattern: more than {MAX_STATES} NFA states (a large {{n,m}}?)")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node, a: int) -> int:
        """States for `node` from state `a`; returns its end state."""
        kind = node[0]
        if kind == "chars":
            b = self.new()
            if node[1]:
                self.edges[a].append((node[1], b))
            return b
        if kind == "cat":
            for item in node[1]:
                a = self.build(item, a)
            return a
        if kind == "alt":
            end = self.new()
            for item in node[1]:
                self.eps[self.build(item, a)].append(end)
            return end
        _, inner, lo, hi = node
        for _ in range(lo):
            a = self.build(inner, a)
        if hi is None:                  # a loop on a state of its own: a -> loop <-> inner, -> end
            loop, end = self.new(), self.new()
            self.eps[a].append(loop)
            self.eps[self.build(inner, loop)].append(loop)
            self.eps[loop].append(end)
            return end
        end = self.new()
        for _ in range(hi - lo):
            self.eps[a].append(end)
            a = self.build(inner, a)
        self.eps[a].append(end)
        return end


@lru_cache(maxsize=256)
def compile_pattern(text: str) -> Regex:
    if not isinstance(text, str):
        raise ValueError(f"pattern must be a string, got {text!r}")
    p = _Parser(text)
    body, head, tail = text, text.startswith("^"), text.endswith("$") and not text.endswith("\\$")
    p.i = 1 if head else 0
    if tail:
        p.s = body = text[:-1]
    tree = p.alt()
    if p.i != len(body):
        p.fail("an unmatched ')'")
    if (head or tail) and tree[0] == "alt":
        p.fail("anchors beside a top-level '|' are not supported: put the alternatives in a group")
    anywhere = ("rep", ("chars", ANY), 0, None)
    tree = ("cat", ([] if head else [anywhere]) + [tree] + ([] if tail else [anywhere]))
    b = _Builder()
    start = b.new()
    accept = b.build(tree, start)
    # trim: keep the states from which `accept` can be reached
    back = [[] for _ in b.edges]
    for s in range(len(b.edges)):
        for _, t in b.edges[s]:
            back[t].append(s)
        for t in b.eps[s]:
            back[t].append(s)
    live, todo = {accept}, [accept]
    while todo:
        for s in back[todo.pop()]:
            if s not in live:
                live.add(s)
                todo.append(s)
    if start not in live:
        p.fail("no string matches it")
    edges = [[(r, t) for r, t in b.edges[s] if t in live] if s in live else [] for s in range(len(b.edges))]
    eps = [[t for t in b.eps[s] if t in live] if s in live else [] for s in range(len(b.eps))]
    rx = Regex(text, edges, eps, accept)
    rx.start = rx.closure([start])
    return rx
