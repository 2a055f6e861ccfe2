"""JSON Schema -> the grammar that `flexkv.serve.json_mode` recognizes byte by byte.

`compile_schema(schema)` gives a `Grammar`: a table of nodes, each one kind of JSON value
(`Obj`, `Arr`, `Str`, `Num`, `Lit`, or a `Union` of them), referring to each other by index, so
recursive schemas (`$ref` to an enclosing definition) are finite tables. JSON mode
(`{"type": "json_object"}`) is the grammar of `{"type": "object"}`.

What a schema may hold, and what it means here (as OpenAI's strict structured outputs and
vLLM's default xgrammar backend read it):
- `type` (one name or a list), `enum`, `const`, `anyOf`, `oneOf` (read as `anyOf`: a text may
  match more than one branch), `allOf` with one member, `$ref` to `#`, `#/$defs/...` or
  `#/definitions/...`; `true` / `{}` for any value.
- Objects: `properties`, `required`, `additionalProperties`. With `properties`, the keys come in
  the schema's order, each at most once, every required one present, and no others
  (`additionalProperties` must be absent or false). Without `properties`, any keys, each value
  of the `additionalProperties` schema (absent or true: any value; false: only `{}`).
- Arrays: `items` (a schema, or false after `prefixItems`), `prefixItems`, `minItems`,
  `maxItems`. Strings: `minLength`, `maxLength` (in characters, as Python's `len` counts
  them; an escape is one, so such a string takes no `\\u` surrogate escapes: a character past
  U+FFFF comes as its UTF-8 bytes); or `pattern` (`flexkv.serve.json_regex`: ECMA-262's common
  subset, matching anywhere unless anchored with ^ / $; not beside a length). `integer` allows
  no fraction or exponent, and takes
  `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (numbers, as in 2020-12); a
  `number` takes no bounds.
- A string's `format` `date`, `time`, `date-time` (RFC 3339), `uuid`, `ipv4`, `hostname` or
  `email` (a dotted domain) is held to, as OpenAI's strict mode holds it, by a pattern
  (`FORMATS`; a `date`'s day is checked against its month, not the year: 29 February always);
  other formats are annotations, as JSON Schema 2020-12 has them.
- Annotations are ignored: `title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`,
  `deprecated`, `readOnly`, `writeOnly`, `discriminator`; `$defs` / `definitions` are only looked up.
- `enum` / `const` values are written in their compact form (`json.dumps(v, separators=(",", ":"),
  ensure_ascii=False)`); a `type` beside them keeps the values of those types.
Anything else (`multipleOf`, `uniqueItems`, `not`, `if`, ...) is a
`ValueError` naming the keyword and where it is: never silently ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

from flexkv.serve.json_regex import MAX_STATES, compile_pattern

MAX_OPTIONS = 1024                    # an anyOf's alternatives, at most (each a thread)
MAX_PATTERN_STATES = 4 * MAX_STATES   # the NFA states of one schema's distinct patterns, in all
                                      # (each costs ~10 us to build, while the request waits)
MAX_SCHEMA_CHARS = 500_000            # a schema's JSON text, at most (an object of 16,000
                                      # properties, or 23,000 prefixItems, compiles in ~0.1 s)

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$schema", "$id",
                         "$comment", "deprecated", "readOnly", "writeOnly", "discriminator",
                         "$defs", "definitions"})
TYPE_KEYWORDS = {"object": {"properties", "required", "additionalProperties"},
                 "array": {"items", "prefixItems", "minItems", "maxItems"},
                 "string": {"minLength", "maxLength", "pattern"},
                 "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_DATE = (r"\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
         r"|02-(?:0[1-9]|[12]\d))")
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d+)?(?:[Zz]|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# the string formats held to (as OpenAI's strict mode does), each as a pattern; others are
# annotations. "date": a day up to 29, 30 or 31 by month (29 February in any year)
FORMATS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[Tt]{_TIME}$",
           "uuid": "^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$",
           "ipv4": f"^(?:{_OCTET}\\.){{3}}{_OCTET}$",
           "hostname": f"^{_LABEL}(?:\\.{_LABEL})*$",
           "email": f"^{_ATOM}(?:\\.{_ATOM})*@{_LABEL}(?:\\.{_LABEL})+$"}
SUPPORTED = (ANNOTATIONS | {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
             | set().union(*TYPE_KEYWORDS.values()))


@dataclass(frozen=True)
class Obj:
    """An object: with `props` ((the key's JSON bytes, its node, required), ...), those keys in
    that order; without, any keys, each value a `values` node (None: no keys at all)."""
    props: tuple = ()
    values: int | None = None
    # derived from props: need[i], a required key is among props[i:]; nexts[i], the props that
    # may come after props[:i] (up to the first required one)
    need: tuple = field(init=False, repr=False, compare=False)
    nexts: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):     # linear in the props (ranges, not tuples, for nexts)
        n = len(self.props)
        first_required = [n] * (n + 1)    # [j]: the first required prop at or after j (n: none)
        for j in range(n - 1, -1, -1):
            first_required[j] = j if self.props[j][2] else first_required[j + 1]
        object.__setattr__(self, "need", tuple(r < n for r in first_required))
        object.__setattr__(self, "nexts", tuple(range(j, min(r, n - 1) + 1)
                                                for j, r in enumerate(first_required)))


@dataclass(frozen=True)
class Arr:
    """An array: item i is `prefix[i]`, then `items` (None: none past the prefix); between
    `min` and `max` items. An array frame counts its items up to `cap`, past which nothing changes."""
    items: int | None
    prefix: tuple = ()
    min: int = 0
    max: int | None = None
    cap: int = 0

    def item(self, i: int) -> int:
        return self.prefix[i] if i < len(self.prefix) else self.items


@dataclass(frozen=True)
class Str:
    """A string of `min` to `max` characters (counted up to `cap` only when limited), or one in
    which `pattern` (`flexkv.serve.json_regex.Regex`) matches."""
    min: int = 0
    max: int | None = None
    cap: int = 0
    pattern: object = None

    @property
    def counted(self) -> bool:
        return self.min > 0 or self.max is not None


@dataclass(frozen=True)
class Num:
    """A number; an integer (no fraction or exponent) between `lo` and `hi` (None: unbounded),
    whose digits the recognizer then carries, to tell whether the bounds can still be met."""
    integer: bool = False
    lo: int | None = None
    hi: int | None = None

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None


@dataclass(frozen=True)
class Lit:
    """One of `texts`, byte for byte (true, false, null, enum and const values)."""
    texts: frozenset


@dataclass(frozen=True)
class Union:
    options: tuple      # node indices, none of them a Union


@dataclass(eq=False)
class Grammar:
    """The compiled schema: `nodes[root]` is the whole text's value."""
    nodes: list = field(default_factory=list)
    root: int = 0
    schema: str = ""    # the canonical schema text it came from

    def __repr__(self):
        return f"Grammar({self.schema})"


def _compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


class _Compiler:
    def __init__(self, schema):
        self.root_schema, self.nodes, self.refs, self.any_node = schema, [], {}, None
        self.pattern_states: dict[str, int] = {}     # each distinct pattern's NFA states

    def add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def fail(self, where: str, msg: str):
        raise ValueError(f"json_schema at {where or '/'}: {msg}")

    def count(self, s: dict, key: str, where: str, default):
        v = s.get(key, default)
        if v is not default and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            self.fail(f"{where}/{key}", f"must be an int >= 0, got {v!r}")
        return v

    def ref(self, target, where: str) -> int:
        if not isinstance(target, str):
            self.fail(f"{where}/$ref", f"must be a string, got {target!r}")
        if target in self.refs:
            return self.refs[target]
        parts = target.split("/")
        if target == "#":
            sub = self.root_schema
        elif len(parts) == 3 and parts[0] == "#" and parts[1] in ("$defs", "definitions"):
            defs = self.root_schema.get(parts[1]) if isinstance(self.root_schema, dict) else None
            name = parts[2].replace("~1", "/").replace("~0", "~")
            sub = defs.get(name) if isinstance(defs, dict) else None
            if sub is None:
                self.fail(f"{where}/$ref", f"{target!r} is not defined")
        else:
            self.fail(f"{where}/$ref", f"only '#', '#/$defs/NAME' and '#/definitions/NAME' are "
                      f"supported, got {target!r}")
        self.refs[target] = i = self.add(None)     # a placeholder: the target may refer to itself
        self.nodes[i] = ("ref", self.node(sub, target[1:]))
        return i

    def node(self, s, where: str = "") -> int:
        if s is True or s == {}:
            return self.any()
        if not isinstance(s, dict):
            self.fail(where, f"a schema must be an object or true, got {json.dumps(s)[:60]}")
        unknown = sorted(set(s) - SUPPORTED)
        if unknown:
            self.fail(f"{where}/{unknown[0]}", f"the keyword {unknown[0]!r} is not supported "
                      f"(supported: {', '.join(sorted(SUPPORTED - ANNOTATIONS))}, and annotations)")
        given = set(s) - ANNOTATIONS
        if "$ref" in s:
            if given != {"$ref"}:
                self.fail(where, f"$ref beside {sorted(given - {'$ref'})} is not supported")
            return self.ref(s["$ref"], where)
        if "allOf" in s:
            if given != {"allOf"} or not isinstance(s["allOf"], list) or len(s["allOf"]) != 1:
                self.fail(f"{where}/allOf", "only allOf of one schema, alone, is supported")
            return self.node(s["allOf"][0], f"{where}/allOf/0")
        for key in ("anyOf", "oneOf"):
            if key in s:
                if given != {key}:
                    self.fail(where, f"{key} beside {sorted(given - {key})} is not supported")
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    self.fail(f"{where}/{key}", "must be a non-empty list of schemas")
                return self.add(("union", [self.node(a, f"{where}/{key}/{i}") for i, a in enumerate(alts)]))
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
                self.fail(f"{where}/type", f"must be one of {TYPES} or a non-empty list of them, "
                          f"got {s['type']!r}")
        if "enum" in s or "const" in s:
            if given - {"enum", "const", "type"}:
                self.fail(where, f"enum / const beside {sorted(given - {'enum', 'const', 'type'})} "
                          "is not supported")
            return self.literals(s, types, where)
        if types is None:   # the types whose keywords it holds, else any value
            types = [t for t, keys in TYPE_KEYWORDS.items() if keys & given] or list(TYPES)
        for t, keys in TYPE_KEYWORDS.items():
            if keys & given and t not in types:
                self.fail(where, f"{sorted(keys & given)} apply to {t}s, not to type {types}")
        kinds = []
        if "number" in types:
            if TYPE_KEYWORDS["integer"] & given:
                self.fail(where, f"{sorted(TYPE_KEYWORDS['integer'] & given)} are supported on "
                          "integers only (type integer), not on numbers")
            kinds.append(self.add(Num()))
        elif "integer" in types:
            kinds.append(self.integer(s, where))
        words = [b for t, b in (("boolean", b"true"), ("boolean", b"false"), ("null", b"null")) if t in types]
        if words:
            kinds.append(self.add(Lit(frozenset(words))))
        if "string" in types:
            kinds.append(self.string(s, where))
        if "array" in types:
            kinds.append(self.array(s, where))
        if "object" in types:
            kinds.append(self.object(s, where))
        return kinds[0] if len(kinds) == 1 else self.add(("union", kinds))

    def any(self) -> int:
        if self.any_node is None:
            self.any_node = i = self.add(None)
            self.nodes[i] = ("union", [self.add(Obj(values=i)),
                                       self.add(Arr(items=i)), self.add(Str()), self.add(Num()),
                                       self.add(Lit(frozenset({b"true", b"false", b"null"})))])
        return self.any_node

    def literals(self, s: dict, types, where: str) -> int:
        if "enum" in s and "const" in s:
            self.fail(where, "enum beside const is not supported")
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list):
            self.fail(f"{where}/enum", f"must be a list, got {values!r}")
        try:
            texts = frozenset(_compact(v) for v in values
                              if types is None or _type_of(v) in types
                              or (_type_of(v) == "integer" and "number" in types))
        except (TypeError, ValueError) as e:
            self.fail(where, f"enum / const values must be JSON values ({e})")
        if not texts:
            self.fail(where, "the enum is empty: nothing can match" if not values else
                      "no enum / const value is of the schema's type: nothing can match")
        return self.add(Lit(texts))

    def integer(self, s: dict, where: str) -> int:
        bound = {}
        for key in TYPE_KEYWORDS["integer"] & set(s):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self.fail(f"{where}/{key}", f"must be a finite number, got {v!r}")
            bound[key] = v
        # the integers allowed: from lo to hi
        los = [math.ceil(bound["minimum"])] if "minimum" in bound else []
        los += [math.floor(bound["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bound else []
        his = [math.floor(bound["maximum"])] if "maximum" in bound else []
        his += [math.ceil(bound["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bound else []
        lo, hi = max(los, default=None), min(his, default=None)
        if lo is not None and hi is not None and hi < lo:
            self.fail(where, f"no integer is within the bounds {bound}: nothing can match")
        return self.add(Num(True, lo, hi))

    def string(self, s: dict, where: str) -> int:
        pattern, key = s.get("pattern"), "pattern"
        if "pattern" in s and not isinstance(pattern, str):
            self.fail(f"{where}/pattern", f"must be a string, got {pattern!r}")
        if "format" in s and not isinstance(s["format"], str):
            self.fail(f"{where}/format", f"must be a string, got {s['format']!r}")
        if s.get("format") in FORMATS:
            if pattern is not None:
                self.fail(where, f"format {s['format']!r} beside a pattern is not supported")
            pattern, key = FORMATS[s["format"]], "format"
        if pattern is not None:
            if "minLength" in s or "maxLength" in s:
                self.fail(where, f"{key} beside minLength / maxLength is not supported (say the "
                          "length in a pattern: {m,n})")
            try:
                regex = compile_pattern(pattern)
            except ValueError as e:
                self.fail(f"{where}/{key}", str(e))
            self.pattern_states[pattern] = len(regex.edges)
            if sum(self.pattern_states.values()) > MAX_PATTERN_STATES:
                self.fail(f"{where}/{key}", f"the schema's patterns need more than "
                          f"{MAX_PATTERN_STATES} NFA states in all")
            return self.add(Str(pattern=regex))
        lo, hi = self.count(s, "minLength", where, 0), self.count(s, "maxLength", where, None)
        if hi is not None and hi < lo:
            self.fail(where, f"maxLength {hi} < minLength {lo}: nothing can match")
        return self.add(Str(lo, hi, max(lo, hi or 0)))

    def array(self, s: dict, where: str) -> int:
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            self.fail(f"{where}/prefixItems", "must be a list of schemas")
        lo, hi = self.count(s, "minItems", where, 0), self.count(s, "maxItems", where, None)
        items = s.get("items", True)
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and hi < lo:
            self.fail(where, f"at most {hi} items but minItems {lo}: nothing can match")
        i = self.add(None)
        self.nodes[i] = Arr(None if items is False else self.node(items, f"{where}/items"),
                            tuple(self.node(p, f"{where}/prefixItems/{j}") for j, p in enumerate(prefix)),
                            lo, hi, max(lo, hi or 0, len(prefix)))
        return i

    def object(self, s: dict, where: str) -> int:
        props, required = s.get("properties"), s.get("required", [])
        extra = s.get("additionalProperties")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.fail(f"{where}/required", "must be a list of property names")
        if props is None:
            for r in required:
                self.fail(f"{where}/required", f"{r!r} is required but there are no properties")
            values = None if extra is False else self.node(True if extra is None else extra,
                                                           f"{where}/additionalProperties")
            return self.add(Obj(values=values))
        if not isinstance(props, dict):
            self.fail(f"{where}/properties", "must be an object of schemas")
        if extra not in (None, False):
            self.fail(f"{where}/additionalProperties", "must be absent or false beside properties "
                      "(the keys are the properties, in order)")
        missing = sorted(set(required) - set(props))
        if missing:
            self.fail(f"{where}/required", f"{missing[0]!r} is required but not a property")
        i = self.add(None)
        self.nodes[i] = Obj(tuple((_compact(k), self.node(v, f"{where}/properties/{k}"), k in required)
                                  for k, v in props.items()))
        return i

    def finish(self, root: int) -> Grammar:
        """Resolve refs to their targets and flatten unions (a union of unions, or one that
        reaches itself without a container between: an error)."""
        def target(i, seen=()):
            node = self.nodes[i]
            if isinstance(node, tuple) and node[0] == "ref":
                if i in seen:
                    self.fail("", "a $ref cycle without a container in between")
                return target(node[1], seen + (i,))
            return i

        def options(i, seen=()):
            i = target(i)
            node = self.nodes[i]
            if not (isinstance(node, tuple) and node[0] == "union"):
                return [i]
            if i in seen:
                self.fail("", "anyOf reaches itself without a container in between")
            return [o for a in node[1] for o in options(a, seen + (i,))]

        merged: dict[frozenset, int] = {}   # the literal options of a union, as one Lit

        def one_literal(opts: list) -> list:
            lits = [o for o in opts if isinstance(self.nodes[o], Lit)]
            if len(lits) < 2:
                return opts
            texts = frozenset().union(*(self.nodes[o].texts for o in lits))
            at = merged.setdefault(texts, len(self.nodes) + len(merged))
            rest = set(lits[1:])
            return [at if o == lits[0] else o for o in opts if o not in rest]

        flat = {}
        for i, node in enumerate(self.nodes):
            if isinstance(node, tuple):
                opts = one_literal(list(dict.fromkeys(options(i))))
                if len(opts) > MAX_OPTIONS:
                    self.fail("", f"an anyOf of more than {MAX_OPTIONS} alternatives (its enum "
                              "and const values counted as one): each is followed while it fits")
                flat[i] = opts[0] if len(opts) == 1 else ("union", tuple(opts))

        def ref(i):
            f = flat.get(i, i)
            return f if isinstance(f, int) else i

        nodes = []
        for i, node in enumerate(self.nodes):
            if i in flat:
                f = flat[i]
                node = Union(f[1]) if isinstance(f, tuple) else None
            elif isinstance(node, Obj):
                node = Obj(tuple((k, ref(v), r) for k, v, r in node.props),
                           None if node.values is None else ref(node.values))
            elif isinstance(node, Arr):
                node = replace(node, items=None if node.items is None else ref(node.items),
                               prefix=tuple(ref(p) for p in node.prefix))
            nodes.append(node)
        nodes += [Lit(texts) for texts in merged]   # (their indices: in order, after the others)
        # a resolved ref or a one-option union points at its target instead of being a node
        g = Grammar(nodes, ref(root))
        self.check_finite(g)
        return g

    def check_finite(self, g: Grammar) -> None:
        """Every node a text can reach has a finite instance (else a model could write itself
        into a value it can never finish, e.g. an object that requires an object like itself)."""
        finite = set()
        while True:
            grown = {i for i, n in enumerate(g.nodes) if i not in finite and n is not None and (
                isinstance(n, (Str, Num, Lit))
                or (isinstance(n, Union) and any(o in finite for o in n.options))
                or (isinstance(n, Arr)   # (items past the prefix are all one node)
                    and all(n.item(j) in finite for j in range(min(n.min, len(n.prefix) + 1))))
                or (isinstance(n, Obj) and all(v in finite for _, v, req in n.props if req)))}
            if not grown:
                break
            finite |= grown
        reach, todo = {g.root}, [g.root]
        while todo:
            n = g.nodes[todo.pop()]
            kids = (n.options if isinstance(n, Union) else
                    (*n.prefix, *(() if n.items is None else (n.items,))) if isinstance(n, Arr) else
                    (*(v for _, v, _ in n.props), *(() if n.values is None else (n.values,)))
                    if isinstance(n, Obj) else ())
            for k in kids:
                if k not in reach:
                    reach.add(k)
                    todo.append(k)
        if reach - finite:
            self.fail("", "a part of the schema has no finite instance (e.g. an object that "
                      "requires a property of its own type): a text could never end")


@lru_cache(maxsize=256)
def _compile(text: str) -> Grammar:
    schema = json.loads(text)
    c = _Compiler(schema)
    g = c.finish(c.node(schema))
    g.schema = text
    return g


def compile_schema(schema) -> Grammar:
    """The grammar of `schema` (a dict, or true), compiled once per distinct schema (an LRU of
    256); a `ValueError` that names the keyword and where it is for what is not supported, or
    says that the schema is longer than `MAX_SCHEMA_CHARS` characters of JSON."""
    try:
        text = json.dumps(schema, allow_nan=False)   # key order kept: it is the order of properties
        if len(text) > MAX_SCHEMA_CHARS:
            raise ValueError(f"json_schema is {len(text)} characters of JSON; at most "
                             f"{MAX_SCHEMA_CHARS} are taken (a schema's compile takes the "
                             "server's time, ~0.2 s a million characters)")
        return _compile(text)
    except (TypeError, RecursionError) as e:
        raise ValueError(f"json_schema must be JSON (a dict of JSON values) nested less deeply "
                         f"than Python's recursion limit: {type(e).__name__}") from None
    except ValueError as e:
        if str(e).startswith("json_schema"):
            raise
        raise ValueError(f"json_schema must be JSON (a dict of JSON values): {e}") from None


JSON_OBJECT = compile_schema({"type": "object"})
