"""Structured output with a JSON Schema (`response_format="json_schema"`, flexkv.serve.json_schema
compiles it, flexkv.serve.json_mode recognizes it).

- Sound (hypothesis): on random schemas of every supported keyword, a text the recognizer
  accepts as complete is `json.loads`-able and valid under `valid` below, an independent
  validator of the same subset; random texts near valid ones and random byte strings too.
- Complete for the texts flexkv asks for (hypothesis): every instance written with the schema's
  key order and compact enum values, with any whitespace between tokens, is accepted byte by
  byte and ends complete.
- The masks equal brute force (every token's bytes simulated) at every state along an instance.
- What is not supported is a `ValueError` naming the keyword and where it is.
- The engine: schema requests beside plain ones give valid instances (or prefixes when cut), the
  plain ones equal `flexkv.generate`; an enum and a top-level number end where they should.
"""
from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkv.serve import Engine, SamplingParams
from flexkv.serve.json_mode import JsonRequest, JsonVocab, feed, initial, is_done, step
from flexkv.serve.json_schema import Obj, compile_schema
from test_serve_engine import SETTINGS, random_prompt, solo
from test_serve_json import ByteTokenizer, tiny64  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- a reference
def valid(value, schema, root=None) -> bool:
    """`value` (from json.loads) is an instance of `schema` (the subset flexkv supports; keys of
    an object with properties in any order, as JSON Schema has it)."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return True
    if "$ref" in schema:
        ref = schema["$ref"]
        return valid(value, root if ref == "#" else root[ref.split("/")[1]][ref.split("/")[2]], root)
    if "anyOf" in schema or "oneOf" in schema:
        return any(valid(value, s, root) for s in schema.get("anyOf", schema.get("oneOf")))
    if "allOf" in schema:
        return all(valid(value, s, root) for s in schema["allOf"])
    kind = _kind(value)
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if kind not in types and not (kind == "integer" and "number" in types):
            return False
    if "const" in schema and not same(value, schema["const"]):
        return False
    if "enum" in schema and not any(same(value, v) for v in schema["enum"]):
        return False
    if kind in ("integer", "number"):
        return (value >= schema.get("minimum", value) and value <= schema.get("maximum", value)
                and value > schema.get("exclusiveMinimum", value - 1)
                and value < schema.get("exclusiveMaximum", value + 1))
    if kind == "string":
        if "pattern" in schema and not re.search(python_pattern(schema["pattern"]), value, re.ASCII):
            return False
        return schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
    if kind == "array":
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return False
        if items is False and len(value) > len(prefix):
            return False
        return all(valid(v, prefix[i] if i < len(prefix) else items, root) for i, v in enumerate(value))
    if kind == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties", False if props is not None else True)
        if any(r not in value for r in schema.get("required", [])):
            return False
        for k, v in value.items():
            if props is not None and k in props:
                if not valid(v, props[k], root):
                    return False
            elif extra is False or not valid(v, extra, root):
                return False
    return True


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(v)]


def same(a, b) -> bool:
    """Equal as JSON values (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def python_pattern(p: str) -> str:
    """The same pattern for Python's `re` (with re.ASCII: \\d, \\w and \\s as ECMA-262 has them on
    ASCII): `$` at the end is the end of the string."""
    return p[:-1] + r"\Z" if p.endswith("$") else p


def loads(text: bytes):
    def no_constant(name):
        raise ValueError(name)
    return json.loads(text.decode("utf-8"), parse_constant=no_constant)


def accepts(schema, text: bytes) -> bool:
    g = compile_schema(schema)
    return is_done(feed(g, initial(g), text))


# ----------------------------------------------------------------------------- schemas, instances
SCALARS = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text("ab\"\\é", max_size=3)
LITERAL_VALUES = st.recursive(SCALARS, lambda v: st.lists(v, max_size=2)
                              | st.dictionaries(st.text("ab", max_size=2), v, max_size=2), max_leaves=4)
NAMES = st.text("abk_\"é", min_size=0, max_size=3)


PATTERNS = [r"^[a-c]{1,3}$", r"^\d{2}-\d{2}$", "x", r"^(ab|c)*$", r"^[^a\d]?$", r"^\w+@\w+$",
            r"é|\\", r"^\s*$"]


def _leaf():
    lengths = st.tuples(st.integers(0, 3), st.integers(0, 3)).map(sorted)
    return st.one_of(
        st.sampled_from([{"type": t} for t in ("integer", "number", "boolean", "null", "string")]
                        + [{}, {"type": ["integer", "null"]}, {"type": ["string", "boolean"]}]),
        lengths.map(lambda lh: {"type": "string", "minLength": lh[0], "maxLength": lh[1]}),
        st.integers(1, 3).map(lambda n: {"type": "string", "minLength": n}),
        st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
        st.tuples(st.sampled_from(["minimum", "exclusiveMinimum", None]), st.integers(-120, 60),
                  st.sampled_from(["maximum", "exclusiveMaximum", None]), st.integers(0, 150)).map(
            lambda t: {"type": "integer"} | ({t[0]: t[1]} if t[0] else {}) | ({t[2]: t[1] + t[3] + 2} if t[2] else {})),
        st.lists(LITERAL_VALUES, min_size=1, max_size=3).map(lambda vs: {"enum": vs}),
        LITERAL_VALUES.map(lambda v: {"const": v}))


def _containers(inner):
    props = st.dictionaries(NAMES, inner, max_size=3)
    return st.one_of(
        props.flatmap(lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
            lambda req: {"type": "object", "properties": p, "required": req}) if p else
            st.just({"type": "object", "properties": {}})),
        inner.map(lambda v: {"type": "object", "additionalProperties": v}),
        st.just({"type": "object", "additionalProperties": False}),
        st.tuples(inner, st.integers(0, 2), st.one_of(st.none(), st.integers(2, 3))).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1]}
            | ({} if t[2] is None else {"maxItems": t[2]})),
        st.lists(inner, min_size=1, max_size=2).map(lambda ps: {"prefixItems": ps, "items": False}),
        st.lists(inner, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}))


SCHEMAS = st.recursive(_leaf(), _containers, max_leaves=6)
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["v"]}}, "$ref": "#/$defs/node"}


@st.composite
def instance(draw, schema, root=None, ws=st.sampled_from(["", " ", "\n  "])):
    """A text of one instance of `schema` as flexkv writes it (the properties in order, enum and
    const values compact), with whitespace `ws` drawn between tokens."""
    root = schema if root is None else root
    w = draw(ws)
    if schema is True or schema == {}:
        return w + json.dumps(draw(LITERAL_VALUES))
    if "$ref" in schema:
        return draw(instance(root[schema["$ref"].split("/")[1]][schema["$ref"].split("/")[2]], root, ws))
    if "anyOf" in schema:
        return draw(instance(draw(st.sampled_from(schema["anyOf"])), root, ws))
    if "enum" in schema or "const" in schema:
        v = draw(st.sampled_from(schema["enum"])) if "enum" in schema else schema["const"]
        return w + json.dumps(v, separators=(",", ":"), ensure_ascii=False)
    types = schema.get("type") or ("object" if "properties" in schema or "additionalProperties" in schema
                                   else "array")
    kind = draw(st.sampled_from(types)) if isinstance(types, list) else types
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -10**6 - 1) + 1)
        hi = schema.get("maximum", schema.get("exclusiveMaximum", 10**6 + 1) - 1)
        return w + str(draw(st.integers(max(lo, -200), min(hi, 300)) | st.integers(lo, hi)))
    if kind == "number":
        return w + draw(st.sampled_from(["0", "-1.5", "2e3", "1E-2", "3.25e+1", "17"]))
    if kind == "boolean":
        return w + draw(st.sampled_from(["true", "false"]))
    if kind == "null":
        return w + "null"
    if kind == "string" and "pattern" in schema:
        p = python_pattern(schema["pattern"])
        s = draw(st.from_regex(re.compile(p, re.ASCII), alphabet=st.characters(
            max_codepoint=0x2FF, exclude_categories=["Cs"])))
        return w + json.dumps(s, ensure_ascii=draw(st.booleans()))
    if kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", 4)
        s = draw(st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]),
                         min_size=lo, max_size=max(lo, hi)))
        return w + json.dumps(s, ensure_ascii=draw(st.booleans()))
    if kind == "array":
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        hi = len(prefix) if items is False else schema.get("maxItems", max(schema.get("minItems", 0), 3))
        n = draw(st.integers(schema.get("minItems", 0), hi))
        parts = [draw(instance(prefix[i] if i < len(prefix) else items, root, ws)) for i in range(n)]
        return w + "[" + ",".join(parts) + draw(ws) + "]"
    props = schema.get("properties")
    if props is None:
        extra = schema.get("additionalProperties", True)
        keys = [] if extra is False else draw(st.lists(st.text("xyz", max_size=2), unique=True, max_size=3))
        pairs = [(k, extra) for k in keys]
    else:
        pairs = [(k, s) for k, s in props.items() if k in schema.get("required", []) or draw(st.booleans())]
    body = ",".join(draw(ws) + json.dumps(k, ensure_ascii=False) + draw(ws) + ":"
                    + draw(instance(s, root, ws)) for k, s in pairs)
    return w + "{" + body + draw(ws) + "}"


def schema_and_text(schemas=st.one_of(SCHEMAS, SCHEMAS, SCHEMAS, st.just(TREE)), loose=False):
    """(a schema, a text of one of its instances), or with `loose`, of an instance of the schema
    without its limits (lengths, counts, required keys, integers, enum values, items: false),
    which may or may not be one of its own."""
    def with_text(s):
        target = loosen(s) if loose else s
        return st.tuples(st.just(s), instance(target, target).map(lambda t: (t + " ").encode()))
    return schemas.flatmap(with_text)


def loosen(schema):
    if not isinstance(schema, dict):
        return schema
    if "enum" in schema or "const" in schema:
        return {}
    out = {k: v for k, v in schema.items()
           if k not in ("minLength", "maxLength", "minItems", "maxItems", "required", "minimum", "pattern",
                        "maximum", "exclusiveMinimum", "exclusiveMaximum")}
    if out.get("type") == "integer":
        out["type"] = "number"
    if out.get("items") is False:
        out["items"] = {}
    for key in ("properties", "$defs"):
        if key in out:
            out[key] = {k: loosen(v) for k, v in out[key].items()}
    for key in ("anyOf", "prefixItems"):
        if key in out:
            out[key] = [loosen(v) for v in out[key]]
    if isinstance(out.get("items"), dict):
        out["items"] = loosen(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = loosen(out["additionalProperties"])
    return out


# ----------------------------------------------------------------------------- the recognizer
@settings(max_examples=400, deadline=None)
@given(case=schema_and_text())
def test_every_instance_is_accepted_byte_by_byte_and_is_valid(case):
    schema, text = case
    g = compile_schema(schema)
    state = initial(g)
    for i, b in enumerate(text):
        state = step(g, state, b)
        assert state, (schema, text[:i + 1])
    assert is_done(state), (schema, text)
    assert valid(loads(text), schema), (schema, text)      # (the generator's own check)


MUTATION = st.text('{}[]":,0123456789.-eatrufnl \\xé', min_size=1, max_size=3)


@settings(max_examples=600, deadline=None)
@given(case=schema_and_text(loose=True), at=st.floats(0, 1), new=MUTATION,
       edit=st.sampled_from(["none", "cut", "insert"]))
def test_what_is_accepted_is_a_valid_instance(case, at, new, edit):
    """Near-misses: instances of the schema without its limits, some with a few characters
    replaced or inserted; accepted as complete only if valid."""
    schema, text = case
    s = text.decode()
    i = int(at * len(s))
    if edit != "none":
        s = s[:i] + new + s[i + (len(new) if edit == "cut" else 0):]
    if accepts(schema, s.encode()):
        assert valid(loads(s.encode()), schema), (schema, s)


@settings(max_examples=300, deadline=None)
@given(schema=SCHEMAS, text=st.text('{}[]":,0123456789.-eatrufnlbk \\', max_size=12))
def test_random_texts_accepted_are_valid(schema, text):
    if accepts(schema, text.encode()):
        assert valid(loads(text.encode()), schema), (schema, text)


def test_keys_come_in_order_required_ones_present_and_lengths_counted():
    person = {"type": "object", "required": ["age"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 3}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", 1]}, "maxItems": 2}}}
    ok = [b'{"age":3}', b'{"name":"ab","age":-1}', b'{"age":0,"tags":["a",1]}',
          b'{ "name" : "\\u00e9" , "age" : 7 }', '{"name":"\U0001F600","age":1}'.encode()]
    bad = [b'{}', b'{"name":"ab"}', b'{"age":3,"name":"ab"}', b'{"age":1.5}', b'{"name":"","age":1}',
           b'{"name":"abcd","age":1}', b'{"age":1,"tags":["a",1,"a"]}', b'{"age":1,"tags":["b"]}',
           b'{"age":1,"x":2}', b'{"age":1,}', b'{"name":"\\ud83d\\ude00","age":1}', b'{"age":01}']
    for t in ok:
        assert accepts(person, t), t
    for t in bad:
        assert not accepts(person, t), t
    assert accepts(TREE, b'{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}')
    assert not accepts(TREE, b'{"v":1,"kids":[{"v":2,"kids":[{},{}]}]}')
    # enum values sharing a start, and a top-level number that may go on
    assert all(accepts({"enum": [1, 12, "x"]}, t) for t in (b"1", b"12", b' "x"\n'))
    assert not accepts({"enum": [1, 12]}, b"123")
    g = compile_schema({"type": "integer"})
    assert is_done(feed(g, initial(g), b"12")) and feed(g, initial(g), b"123")
    # bounded integers: a prefix lives while some integer in bounds begins with it
    g = compile_schema({"type": "integer", "minimum": -3, "exclusiveMaximum": 13})
    assert [t for t in (b"-", b"-3", b"-4", b"-0", b"0", b"1", b"12", b"13", b"120", b"2", b"20")
            if feed(g, initial(g), t)] == [b"-", b"-3", b"-0", b"0", b"1", b"12", b"2"]
    for lo, hi in ((-3, 12), (10, 150), (-150, -10)):
        assert [v for v in range(-200, 2000) if accepts({"type": "integer", "minimum": lo, "maximum": hi},
                                                        str(v).encode())] == list(range(lo, hi + 1))


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "a(?=b)"}, "at /pattern: pattern 'a(?=b)' at 2: lookaround"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "pattern beside minLength / maxLength"),
    ({"type": "string", "pattern": r"(a)\1"}, "the escape \\1 is not supported"),
    ({"type": "string", "pattern": "[^\\s\\S]"}, "no string matches it"),
    ({"type": "string", "pattern": "a{5000}"}, "more than 4096 NFA states"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}},
     "at /properties/n/multipleOf: the keyword 'multipleOf' is not supported"),
    ({"type": "number", "minimum": 0}, "apply to integers"),
    ({"type": ["number", "null"], "maximum": 0}, "apply to integers"),
    ({"type": "integer", "minimum": 3, "exclusiveMaximum": 3}, "no integer is within the bounds"),
    ({"type": "integer", "minimum": "0"}, "minimum: must be a finite number"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems' is not supported"),
    ({"not": {}}, "'not' is not supported"),
    ({"$ref": "#/components/x"}, "only '#', '#/$defs/NAME'"),
    ({"$ref": "#/$defs/x"}, "'#/$defs/x' is not defined"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "a $ref cycle"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"},
     "anyOf reaches itself"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b' is required but not a property"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True},
     "additionalProperties: must be absent or false beside properties"),
    ({"type": "strin"}, "at /type: must be one of"),
    ({"type": "string", "items": {}}, "apply to arrays"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "nothing can match"),
    ({"type": "array", "minItems": -1}, "minItems: must be an int >= 0"),
    ({"enum": []}, "the enum is empty"),
    ({"type": "string", "enum": [1, 2]}, "no enum / const value is of the schema's type"),
    ({"allOf": [{}, {}]}, "only allOf of one schema"),
    ({"anyOf": [{}], "type": "string"}, "anyOf beside ['type'] is not supported"),
    ({"$ref": "#", "type": "object"}, "$ref beside ['type']"),
    (False, "a schema must be an object or true"),
    ({"$defs": [1], "$ref": "#/$defs/a"}, "'#/$defs/a' is not defined"),
    ({"type": "string", "pattern": ["a"]}, "pattern: must be a string"),
    ({"type": "string", "format": ["date"]}, "format: must be a string"),
    ({"type": "string", "enum": ["a", "bb"], "maxLength": 1}, "enum / const beside ['maxLength']"),
    ({"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}, "no finite instance"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {
        "n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}}, "no finite instance"),
    ({"enum": [float("nan")]}, "json_schema must be JSON"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^a{{4000}}{i}$"}
                                       for i in range(5)}},
     "json_schema at /properties/p4/pattern: the schema's patterns need more than 16384 NFA states"),
    ({"anyOf": [{"type": "string", "maxLength": i} for i in range(1025)]},
     "an anyOf of more than 1024 alternatives"),
])
def test_what_is_not_supported_is_a_clear_error(schema, message):
    with pytest.raises(ValueError, match="json_schema") as e:
        compile_schema(schema)
    assert message in str(e.value), str(e.value)


@settings(max_examples=200, deadline=None)
@given(required=st.lists(st.booleans(), max_size=12))
def test_an_objects_tables_are_its_definition(required):
    """Obj's derived tables (linear to build), against their definition: need[j], a required
    key is among props[j:]; nexts[j], the props that may come after props[:j], up to the first
    required one."""
    n = len(required)
    obj = Obj(props=tuple((b'"k%d"' % j, 0, r) for j, r in enumerate(required)))
    req = [j for j, r in enumerate(required) if r]
    assert obj.need == tuple(any(r >= j for r in req) for j in range(n + 1))
    assert [tuple(x) for x in obj.nexts] == [
        tuple(range(j, next((r for r in req if r >= j), n - 1) + 1)) for j in range(n + 1)]


def test_an_anyof_of_many_literals_is_one_thread():
    """A union's enum / const alternatives are one literal node (one thread, not one each: an
    anyOf of 100,000 consts cost a second a byte), and accept exactly their values."""
    schema = {"anyOf": [{"const": f"v{i}"} for i in range(5000)] + [{"enum": [1, None]},
                                                                     {"type": "integer"}]}
    g = compile_schema(schema)
    for text in (b'"v4999"', b'"v0"', b"1", b"null", b"12"):
        assert is_done(feed(g, initial(g), text)), text
    for text in (b'"v5000"', b'"v"', b"true"):
        assert not is_done(feed(g, initial(g), text)), text
    assert len(feed(g, initial(g), b'"v12')) == 1 and len(feed(g, initial(g), b"1")) <= 3


def test_a_wide_object_compiles_in_linear_time(monkeypatch):
    """20,000 optional properties (0.6 MB of schema, over the server's bound, which is lifted
    here): 105 s to compile when an object's tables were quadratic; now well under a second."""
    from flexkv.serve import json_schema

    monkeypatch.setattr(json_schema, "MAX_SCHEMA_CHARS", 10**7)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20000)}}
    start = time.perf_counter()
    g = compile_schema(schema)
    assert time.perf_counter() - start < 10
    assert is_done(feed(g, initial(g), b'{"p3": 1, "p19999": 2}'))
    assert not feed(g, initial(g), b'{"p3": 1, "p2"')


def test_a_schema_over_the_size_bound_is_refused_before_compiling():
    """A schema's JSON text over `MAX_SCHEMA_CHARS` is a ValueError that gives both lengths,
    before any compile (a 12 MB one took ~5 s of the server's time); one just under compiles."""
    from flexkv.serve.json_schema import MAX_SCHEMA_CHARS

    def wide(n):
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}
    n = MAX_SCHEMA_CHARS // 30 * 2     # ~30 characters a property: about twice the bound
    text = json.dumps(wide(n))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"json_schema is {len(text)} characters of JSON; at "
                       rf"most {MAX_SCHEMA_CHARS} are taken"):
        compile_schema(wide(n))
    assert time.perf_counter() - start < 2
    while len(json.dumps(wide(n))) > MAX_SCHEMA_CHARS:
        n = n * 9 // 10
    assert compile_schema(wide(n)).root is not None


def test_annotations_pass_and_pydantic_schemas_compile():
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(description="its name", max_length=8)
        kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})

    class Owner(pydantic.BaseModel):
        owner: str | None = None
        pets: list[Pet]
        best: Pet | None = None

    schema = Owner.model_json_schema()
    text = b'{"owner":null,"pets":[{"name":"Rex","kind":"dog"}],"best":{"name":"Tom","kind":"cat"}}'
    assert accepts(schema, text) and Owner.model_validate_json(text)
    assert not accepts(schema, b'{"pets":[{"name":"Rex","kind":"cow"}]}')
    assert accepts({"title": "T", "description": "d", "format": "uri", "type": "string",
                    "examples": ["x"], "$schema": "https://json-schema.org/draft/2020-12/schema"}, b'"x"')


# ----------------------------------------------------------------------------- masks
TOKEN_BYTES = st.lists(st.sampled_from(list(b'{}[]":,0123456789.eE-+tfnrulabk \\\n\xc3\xa9x')),
                       min_size=1, max_size=4).map(bytes)


@settings(max_examples=80, deadline=None)
@given(tokens=st.lists(st.one_of(st.none(), TOKEN_BYTES), min_size=1, max_size=50),
       case=schema_and_text(), memo=st.sampled_from([1, 4096]))
def test_masks_equal_brute_force(tokens, case, memo):
    schema, text = case
    g = compile_schema(schema)
    vocab = JsonVocab(tokens, memo=memo)
    for i in range(len(text) + 1):
        state = feed(g, initial(g), text[:i])
        for _ in range(2):                                  # a fresh mask, then the memo's
            mask, some = vocab.allowed(g, state)
            want = [bool(bs) and bool(feed(g, state, bs)) for bs in tokens]
            assert mask.tolist() == want, (schema, text[:i])
            assert some == any(want)


def ambiguous(depth: int, a=(("maxItems", 3),), b=(("minItems", 1),)) -> dict:
    """Arrays nested `depth` deep, each level `anyOf` two that read alike up to their item
    counts (`a` and `b`: by default at most 3 items; at least 1): 2^depth stacks of
    alternatives after `[` * depth."""
    defs = {"l0": {"type": "string", "maxLength": 2}}
    for i in range(1, depth + 1):
        below = {"$ref": f"#/$defs/l{i - 1}"}
        defs[f"l{i}"] = {"anyOf": [{"type": "array", "items": below, **dict(a)},
                                   {"type": "array", "items": below, **dict(b)}]}
    return {"$defs": defs, "$ref": f"#/$defs/l{depth}"}


NESTED = st.recursive(st.text("ab", max_size=3), lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(value=NESTED, depth=st.integers(1, 6))
def test_alike_branches_through_nested_containers_stay_few_threads(value, depth):
    """A few threads at every byte however deep alike branches nest (the stacks share their
    parts), and a text is accepted exactly when it is valid, its every prefix live then."""
    schema = ambiguous(depth)
    g = compile_schema(schema)
    text, state, alive = json.dumps(value).encode(), initial(g), True
    for b in text:
        state = step(g, state, b)
        assert len(state) <= 4, (text, state)
        alive = alive and bool(state)
    assert is_done(state) == valid(value, schema), text
    assert alive or not valid(value, schema)


NESTED_TOKENS = [b"[", b"]", b"]]", b"]]]", b",", b'"a"', b'"', b"a", b",[", b"],[", b"]],[[",
                 b"]]]]", b"]],", None]
ONE_OR_TWO = st.recursive(st.just("a"), lambda inner: st.lists(inner, min_size=1, max_size=2), max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(ONE_OR_TWO, min_size=1, max_size=6), depth=st.integers(2, 4))
def test_masks_of_forked_stacks_equal_brute_force(values, depth):
    """Masks memoized across states whose stacks fork (alike branches: one item, or exactly
    two) equal brute force: what a token can close is keyed by every way below the fork."""
    g = compile_schema(ambiguous(depth, (("maxItems", 1),), (("minItems", 2), ("maxItems", 2))))
    vocab = JsonVocab(NESTED_TOKENS)
    for value in values:
        text = json.dumps(value, separators=(",", ":")).encode()
        for i in range(len(text) + 1):
            state = feed(g, initial(g), text[:i])
            if not state:
                break
            mask, _ = vocab.allowed(g, state)
            assert mask.tolist() == [bool(bs) and bool(feed(g, state, bs)) for bs in NESTED_TOKENS], text[:i]


def test_deeply_nested_alike_branches_cost_little():
    """A 5 KB schema whose alternatives stay alike 40 arrays deep (2^40 stacks of alternatives
    spelled out): its states and masks come at once."""
    g = compile_schema(ambiguous(40))
    vocab = JsonVocab([b"[", b"]", b'"a"', b",", b"[[", b"]]", b'"', b"a", None])
    state, start = initial(g), time.perf_counter()
    for token in [b"[["] * 20 + [b'"a"'] + [b"]]"] * 20:
        mask, some = vocab.allowed(g, state)
        assert some and mask[vocab.tokens[[bs for _, bs in vocab.tokens].index(token)][0]]
        state = feed(g, state, token)
        assert 0 < len(state) <= 4 and sum(len(stacks) for _, _, stacks in state) <= 8
    assert is_done(state) and time.perf_counter() - start < 5


def test_different_alternatives_nested_add_up_rather_than_multiply():
    """200 objects, each with a property of 200 alternatives (patterns): a thread per live
    alternative of the property, on the 200 objects' stacks at once (200 x 111 before)."""
    schema = {"$defs": {"u": {"anyOf": [{"type": "string", "pattern": f"^x{j}"} for j in range(200)]}},
              "anyOf": [{"type": "object", "properties": {"p": {"$ref": "#/$defs/u"},
                                                          f"q{i}": {"type": "integer"}},
                         "required": ["p"]} for i in range(200)]}
    g = compile_schema(schema)
    state = feed(g, initial(g), b'{"p": "x1')
    assert len(state) == 111                     # x1, x10-x19, x100-x199
    done = feed(g, state, b'5", "q7": 3}')
    assert is_done(done) and not feed(g, state, b'5", "q200": 3}')


# ----------------------------------------------------------------------------- the engine
ENGINE_SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
     "required": ["b"]},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 40}},
     "required": ["n"]},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
    TREE,
]


def check_tokens(tokens: list[int], reason: str, schema):
    """The tokens are one instance of `schema` (`reason` "stop") or the start of one."""
    assert all(t < 256 for t in tokens), tokens
    req = JsonRequest(compile_schema(schema))
    for n, t in enumerate(tokens):
        assert req.advance(bytes([t])), bytes(tokens[:n + 1])
    if reason == "stop":
        assert req.done and valid(loads(bytes(tokens)), schema), bytes(tokens)


@SETTINGS
@given(data=st.data())
def test_engine_schema_requests_beside_plain_ones(tiny64, data):  # noqa: F811 (the fixture)
    d = data.draw
    V = tiny64.args.vocab_size
    eng = Engine(tiny64, ByteTokenizer(), "h2o", budget=12, max_slots=d(st.integers(1, 3)),
                 max_new_tokens=30, max_prompt_tokens=20, prefill_chunk=8)
    reqs = []
    for i in range(d(st.integers(2, 4))):
        schema = d(st.sampled_from([None] + ENGINE_SCHEMAS))
        # a push toward ending values, so some requests finish them
        extra = {} if schema is None else dict(
            response_format="json_schema", json_schema=schema, temperature=d(st.sampled_from([0.0, 1.0])),
            seed=i, logit_bias=d(st.sampled_from(
                [None, {ord("}"): 4.0, ord("]"): 4.0, ord('"'): 3.0, 256: 20.0}])))
        reqs.append((random_prompt(d(st.integers(2, 20)), 50 + i, V),
                     SamplingParams(max_tokens=d(st.integers(1, 30)), **extra)))
    handles = [eng.submit(p, sp) for p, sp in reqs]
    while eng.has_work():
        eng.step()
    for (prompt, sp), h in zip(reqs, handles):
        if sp.json_schema is not None:
            check_tokens(h.tokens, h.finish_reason, sp.json_schema)
        else:
            want, _ = solo(tiny64, prompt, sp.max_tokens, 8, "h2o", dict(budget=12))
            assert h.tokens == want[:len(h.tokens)]
    assert not eng._adjust.slots


def test_an_enum_and_a_number_end_where_they_should(tiny64):  # noqa: F811 (the fixture)
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=2, max_new_tokens=12, max_prompt_tokens=30,
                 prefill_chunk=8)
    prompt = random_prompt(10, 4, tiny64.args.vocab_size)
    eos = {256: 60.0}
    enum = eng.submit(prompt, SamplingParams(max_tokens=12, response_format="json_schema",
                                             json_schema={"enum": ["yes", "no", 3]}, logit_bias=eos))
    # eos beats every digit, and is allowed once the number is whole: one digit, then the end
    integer = dict(response_format="json_schema", json_schema={"type": "integer"})
    number = eng.submit(prompt, SamplingParams(max_tokens=12, logit_bias=eos | {ord("7"): 40.0},
                                               **integer))
    # without eos the number goes on (only digits may follow a whole one)
    digits = eng.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True,
                                                   logit_bias={ord("7"): 40.0}, **integer))[0]
    while eng.has_work():
        eng.step()
    assert enum.finish_reason == "stop" and loads(bytes(enum.tokens)) in ("yes", "no", 3)
    m = eng.metrics()       # what the masks cost, in the engine's metrics and in Prometheus text
    assert m["structured_masks_computed_total"] >= 3 and m["structured_mask_seconds_total"] > 0
    assert 0 < m["structured_masks_kept"] <= m["structured_masks_computed_total"]
    from flexkv.serve.metrics import prometheus_text
    text = prometheus_text(eng, "m", {"queue_full": 0, "disconnects": 0})
    assert "# TYPE flexkv_structured_masks_computed_total counter" in text
    assert number.finish_reason == "stop" and bytes(number.tokens) == b"7"
    assert bytes(digits) == b"77777"


def test_a_request_over_its_mask_time_is_ended_and_the_others_go_on(tiny64):  # noqa: F811
    """A structured request whose recognizer and masks take more than the engine's
    `max_mask_seconds` ends with finish reason "error" and a message that says why; a plain
    request beside it still equals `flexkv.generate`, and its freed slot serves the next
    request as a fresh one; the default bound lets the same request through."""
    import flexkv.serve.penalties as penalties

    prompt = random_prompt(10, 5, tiny64.args.vocab_size)
    structured = SamplingParams(max_tokens=12, response_format="json_object")
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=2, max_new_tokens=12, max_prompt_tokens=30,
                 prefill_chunk=8, max_mask_seconds=1e-9)    # every structured request is over it
    costly = eng.submit(prompt, structured)
    plain = eng.submit(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    while eng.has_work():
        eng.step()
    assert costly.finish_reason == "error" and len(costly.tokens) == 1
    assert costly.error.startswith(penalties.OVER_BUDGET) and "more than 1e-09 s" in costly.error
    solo_tokens = solo(tiny64, prompt, 12, 8, "full", {})[0]
    assert plain.tokens == solo_tokens
    assert eng.metrics()["structured_over_budget_total"] == 1
    again = eng.generate([prompt, prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    assert again == [solo_tokens, solo_tokens]                # both slots as fresh ones
    free = Engine(tiny64, ByteTokenizer(), "full", max_slots=1, max_new_tokens=12,
                  max_prompt_tokens=30, prefill_chunk=8)     # the default bound, 10 s
    out = free.submit(prompt, structured)
    while free.has_work():
        free.step()
    assert out.finish_reason != "error" and bytes(out.tokens)[:1] in (b"{", b" ", b"\n", b"\t", b"\r")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "5", None])
def test_max_mask_seconds_is_checked(tiny64, bad):  # noqa: F811 (the fixture)
    with pytest.raises(ValueError, match=r"max_mask_seconds must be a number of seconds > 0"):
        Engine(tiny64, ByteTokenizer(), "full", max_slots=1, max_new_tokens=4,
               max_prompt_tokens=30, max_mask_seconds=bad)


def test_sampling_params_check_the_schema(tiny64):  # noqa: F811 (the fixture)
    eng = Engine(tiny64, ByteTokenizer(), "full", max_slots=1, max_new_tokens=16, max_prompt_tokens=30)
    with pytest.raises(ValueError, match="json_schema at /pattern"):
        eng.submit([1, 2], SamplingParams(response_format="json_schema",
                                          json_schema={"type": "string", "pattern": "(?!x)"}))
    with pytest.raises(ValueError, match="given exactly when response_format is 'json_schema'"):
        eng.submit([1, 2], SamplingParams(response_format="json_schema"))
    with pytest.raises(ValueError, match="given exactly when response_format is 'json_schema'"):
        eng.submit([1, 2], SamplingParams(json_schema={"type": "string"}))
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        Engine(tiny64, None, "full", max_slots=1, max_new_tokens=16, max_prompt_tokens=30).submit(
            [1, 2], SamplingParams(response_format="json_schema", json_schema={}))


# ----------------------------------------------------------------------------- formats
def _format_ok(fmt: str, s: str) -> bool:
    """Python's own parsers (a date's day checked against its month in a leap year, as flexkv's
    pattern has it: RFC 3339's years 0000-9999, 29 February in any)."""
    import datetime
    import ipaddress
    import uuid
    try:
        if fmt == "date":
            y, m, d = s.split("-")
            datetime.date(2000, int(m), int(d))
            return len(y) == 4 and len(m) == len(d) == 2 and y.isdigit()
        if fmt == "uuid":
            return len(s) == 36 and str(uuid.UUID(s)) == s.lower()
        if fmt == "ipv4":
            ipaddress.IPv4Address(s)
            return s.isascii()
    except ValueError:
        return False
    raise AssertionError(fmt)


@settings(max_examples=300, deadline=None)
@given(fmt=st.sampled_from(["date", "uuid", "ipv4"]), data=st.data())
def test_formats_accept_what_pythons_parsers_accept(fmt, data):
    """Strings drawn from the format's pattern, and near-misses of them (a character replaced):
    accepted exactly when Python's parser takes them."""
    from flexkv.serve.json_schema import FORMATS
    s = data.draw(st.from_regex(re.compile(python_pattern(FORMATS[fmt]), re.ASCII)))
    if data.draw(st.booleans()) and s:
        i = data.draw(st.integers(0, len(s) - 1))
        s = s[:i] + data.draw(st.sampled_from("0139-.:aZ")) + s[i + 1:]
    g = compile_schema({"type": "string", "format": fmt})
    assert is_done(feed(g, initial(g), json.dumps(s).encode())) == _format_ok(fmt, s), (fmt, s)


def test_time_hostname_email_formats_and_other_formats_pass():
    cases = {"time": (["12:30:00Z", "23:59:60.5+01:00", "00:00:00.123-11:30"], ["24:00:00Z", "12:30:00", "1:30:00Z"]),
             "date-time": (["2024-05-17T12:30:00Z", "2024-02-29t00:00:00+00:00"], ["2024-05-17 12:30:00Z", "2024-05-17"]),
             "hostname": (["example.com", "a", "x-1.y"], ["-bad.com", "a..b", "a_b.com"]),
             "email": (["a.b@example.org", "x+y@a-b.co"], ["a@b", "a..b@x.org", "@x.org", "a@-x.org"])}
    for fmt, (ok, bad) in cases.items():
        assert all(accepts({"type": "string", "format": fmt}, json.dumps(s).encode()) for s in ok), fmt
        assert not any(accepts({"type": "string", "format": fmt}, json.dumps(s).encode()) for s in bad), fmt
    # formats flexkv does not hold to are annotations; formats on other types too
    assert accepts({"type": "string", "format": "uri"}, b'"not a uri"')
    assert accepts({"type": "integer", "format": "int64"}, b"12")
    with pytest.raises(ValueError, match="format 'date' beside a pattern"):
        compile_schema({"type": "string", "format": "date", "pattern": "x"})
    with pytest.raises(ValueError, match="format beside minLength"):
        compile_schema({"type": "string", "format": "uuid", "maxLength": 36})


SUPPORTED_KEYS = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "properties",
                  "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
                  "minLength", "maxLength", "pattern", "format", "minimum", "exclusiveMaximum", "title", "x",
                  "a", "definitions"}
JSON_ANY = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False)
                        | st.sampled_from(["string", "integer", "object", "array", "#", "#/$defs/a", "a+",
                                           "#/definitions/a", "date", "^x$", "(", "", 10**9]),
                        lambda v: st.lists(v, max_size=3) | st.dictionaries(
                            st.sampled_from(sorted(SUPPORTED_KEYS)), v, max_size=4), max_leaves=10)
@settings(max_examples=1500, deadline=None)
@given(schema=JSON_ANY)
def test_any_json_as_a_schema_compiles_or_is_a_value_error(schema):
    """Whatever a client sends as a schema: a grammar, or a ValueError (a 400), never another
    exception (a 500)."""
    try:
        g = compile_schema(schema)
    except ValueError:
        return
    feed(g, initial(g), b'{"a": [1, "x", null, true]}')


def test_a_schema_nested_too_deeply_is_a_value_error():
    schema = {}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ValueError, match="nested less deeply than Python's recursion limit"):
        compile_schema(schema)
