"""JSON Schema's `pattern` (flexkv.serve.json_regex) against Python's `re`.

- The NFA (hypothesis): on random patterns of the supported syntax and random strings, matching
  (anywhere, or anchored with ^ / $) equals `re.search` with re.ASCII (where ECMA-262's \\d \\w
  \\s agree with Python's on the strings drawn; `$` at the end as `\\Z`).
- In a JSON string (hypothesis): the string's text, raw UTF-8 or escaped (`\\n`, `\\u00e9`), is
  accepted exactly when the pattern matches the decoded string.
- No dead ends: a partly written character (a UTF-8 lead byte, a `\\u` escape's first digits)
  is taken only if some way to finish it matches.
"""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv.serve.json_mode import feed, initial, is_done
from flexkv.serve.json_regex import compile_pattern
from flexkv.serve.json_schema import compile_schema

ATOMS = st.sampled_from(["a", "b", "é", "-", r"\.", ".", "[ab]", "[^a]", "[a-c]", r"[\d_]", r"\d",
                         r"\w", r"\s", r"\D", r"\W", r"\S", r"\x61", r"\u00e9", r"\n", "{", "}"])
QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "+?"])
ALPHABET = "ab-.1 é_\n\t{}"


def _pattern(depth=2):
    piece = st.tuples(ATOMS, QUANTIFIERS).map("".join)
    if depth:
        group = st.tuples(st.sampled_from(["(", "(?:"]), _pattern(depth - 1), QUANTIFIERS).map(
            lambda t: t[0] + t[1] + ")" + t[2])
        piece = piece | group
    seq = st.lists(piece, min_size=1, max_size=3).map("".join)
    return st.lists(seq, min_size=1, max_size=2).map("|".join)


PATTERNS = st.tuples(st.booleans(), _pattern(), st.booleans()).map(
    lambda t: ("^" if t[0] else "") + (f"(?:{t[1]})" if "|" in t[1] and (t[0] or t[2]) else t[1])
    + ("$" if t[2] else ""))


def python(p: str) -> str:
    """The pattern for Python's `re`: `$` at the end is the end of the string."""
    return p[:-1] + r"\Z" if p.endswith("$") else p


def matches(p: str, s: str) -> bool:
    rx = compile_pattern(p)
    states = rx.start
    for ch in s:
        states = rx.step(states, ord(ch))
        if not states:
            return False
    return rx.accepts(states)


@settings(max_examples=800, deadline=None)
@given(p=PATTERNS, s=st.text(ALPHABET, max_size=6))
def test_matching_equals_python_re(p, s):
    assert matches(p, s) == bool(re.search(python(p), s, re.ASCII)), (p, s)


@settings(max_examples=300, deadline=None)
@given(p=PATTERNS, s=st.text(ALPHABET + "\"\\\x01ü", max_size=6), ascii_=st.booleans())
def test_a_json_string_is_accepted_exactly_when_its_text_matches(p, s, ascii_):
    g = compile_schema({"type": "string", "pattern": p})
    text = json.dumps(s, ensure_ascii=ascii_).encode()
    assert is_done(feed(g, initial(g), text)) == bool(re.search(python(p), s, re.ASCII)), (p, text)


@pytest.mark.parametrize("pattern, alive, dead", [
    ("^[é-ë]$", [b'"\xc3', b'"\xc3\xa9', b'"\\u00e', b'"\\u00', b'"\\u0'], [b'"\xc4', b'"\\u00f', b'"\\u01', b'"a']),
    ("^[a-z]+$", [b'"a', b'"\\u006', b'"a\\u00'], [b'"\xc3', b'"a\\u01', b'"\\u00e']),
    ("^\\u4e2d$", [b'"\xe4', b'"\xe4\xb8', b'"\\u4'], [b'"\xe5', b'"\xe4\xb9', b'"\\u5']),
    ("😀", [b'"\xf0\x9f\x98', b'"x\xf0'], [b'"\\ud83d']),
])
def test_a_partly_written_character_lives_only_if_it_can_match(pattern, alive, dead):
    g = compile_schema({"type": "string", "pattern": pattern})
    for t in alive:
        assert feed(g, initial(g), t), t
    for t in dead:
        assert not feed(g, initial(g), t), t


def test_named_groups_lazy_quantifiers_and_literal_braces():
    assert matches("^(?<year>\\d{4})-(?<m>\\d\\d)$", "2024-05") and not matches("^(?<y>\\d{4})$", "24")
    assert matches("^a+?b{1,2}?$", "aabb") and matches("^{x}$", "{x}") and matches("^a{,2}$", "a{,2}")
    assert matches(r"^\$\^$", "$^") and matches("^[\\]a-]$", "]") and matches("^[\\]a-]$", "-")
