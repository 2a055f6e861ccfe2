"""RULER's five generators (niah, variable_tracking, common_words_extraction, freq_words_extraction,
qa) and the haystack-size search. See `flexkv.ruler` for where each choice comes from.

Each generator draws a sample's content (keys, values, chains, words, distractor order) from `rng`
and returns `build(n) -> (input, answer_prefix, outputs)` plus the range of the haystack size `n`.
`build` is a pure function of `n` (its placement randomness is re-seeded from `place` on every
call) and grows the prompt with `n` (prefix-stable orders instead of `random.sample(pop, k)`), so
`fit` can search for the largest `n` whose prompt fits.
"""
from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from . import data

Build = Callable[[int], tuple[str, str, tuple[str, ...]]]


class Haystack(NamedTuple):
    build: Build  # haystack size n -> (input, answer_prefix, outputs)
    n_min: int
    n_max: int
    skip: Callable[[int], None] | None = None  # drop the n-th piece (qa: a document too long to fit)


BIG = 10**9  # "no upper bound" for haystacks that can repeat forever

# --- data/synthetic/constants.py (templates, answer prefixes); template.py's 'base' adds nothing.
TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
        "magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
        "are assgined the value {query}, they are: "),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
        "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
        "above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
        "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
        "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
        " Answer:"),
}

# What each template's question (after {context}) starts with: the split kvpress's pipeline makes
# between the context it compresses and the question it appends (RULER's own data has no such
# split; kvpress's RULER dataset cuts at the question the same way). niah: "\nWhat are all ..." or,
# singular, "\nWhat is ..."; cwe's in-context example has a question too, the last one is the
# sample's.
QUESTION_MARKERS = {
    "niah": "\nWhat ",
    "variable_tracking": "\nQuestion: ",
    "common_words_extraction": "\nQuestion: ",
    "freq_words_extraction": "\nQuestion: ",
    "qa": "\n\nAnswer the question based on the given documents.",
}

# --- niah.py
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): no .5 ties
_SENT_END = r"(?<=[.!?])|(?<=[.!?][\"')\]])"  # stands in for nltk's sent_tokenize
_SENT_SPLIT = re.compile(rf"(?:{_SENT_END}) (?=[\"'(\[]?[A-Z0-9])")


def _random(kind: str, r: random.Random) -> str:
    if kind == "numbers":
        return str(r.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=r.getrandbits(128), version=4))
    pool = data.word_pool()  # kind == "words": RULER draws "adjective-noun" from wonderwords
    return f"{r.choice(pool)}-{r.choice(pool)}"


def niah(args: dict[str, Any], rng: random.Random, place: str, length: int) -> Haystack:
    tk, tv, hay = args["type_needle_k"], args["type_needle_v"], args["type_haystack"]
    nk, nv, nq = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(_random(tk, rng))
        values.append([_random(tv, rng) for _ in range(nv)])
        needles += [NEEDLE.format(type_needle_v=tv, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    picked = rng.sample(range(nk), nq)
    queries, outputs = [keys[i] for i in picked], tuple(v for i in picked for v in values[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]
    unit = tv  # "numbers" / "uuids" (needles always use the plural)
    if nq * nv == 1:  # niah.py's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        unit = tv[:-1]
    prefix = prefix.format(type_needle_v=unit, query=query)
    words = data.essay_words() if hay == "essay" else ()

    def build(n: int):
        r = random.Random(place)
        if hay == "essay":
            sents = _SENT_SPLIT.split(" ".join(words[:n]).strip())
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in r.sample(DEPTHS, len(needles))) + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if hay == "repeat":
                sents = [REPEAT] * n
            else:  # "needle": distractor needles with fresh keys (never one of ours) and values
                sents = []
                while len(sents) < n:
                    k = _random(tk, r)
                    if k not in keys:
                        sents.append(NEEDLE.format(type_needle_v=tv, key=k, value=_random(tv, r)))
            for i, needle in zip(sorted(r.sample(range(n), len(needles)), reverse=True), needles):
                sents.insert(i, needle)
            context = "\n".join(sents)
        return template.format(type_needle_v=unit, context=context, query=query), prefix, outputs

    return Haystack(build, 1 if hay == "essay" else len(needles), len(words) if hay == "essay" else BIG)


# --- variable_tracking.py
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
VT_ICL_LENGTH = 500  # main() builds the in-context example with max_seq_length=500


def _chains(r: random.Random, num_chains: int, num_hops: int, k: int):
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(r.choices(string.ascii_uppercase, k=k))
        if name not in names:
            names.append(name)
    groups = [names[i:i + num_hops + 1] for i in range(0, len(names), num_hops + 1)]
    chains = [[f"VAR {g[0]} = {r.randint(10000, 99998)}"]
              + [f"VAR {g[j + 1]} = VAR {g[j]} " for j in range(num_hops)] for g in groups]
    return groups, chains


def _vt_text(n: int, chains, num_v: int, r: random.Random) -> tuple[str, str]:
    sents = [VT_NOISE] * n
    for chain in chains:
        for j, p in enumerate(sorted(r.sample(range(len(sents)), len(chain)))):
            sents.insert(p + j, chain[j])
    context = " ".join(sents).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    template, prefix = TEMPLATES["variable_tracking"]
    return template.format(context=context, query=value), prefix.format(num_v=num_v, query=value)


def variable_tracking(args: dict[str, Any], rng: random.Random, place: str, length: int,
                      count: Callable[[str], int], tokens_to_generate: int) -> Haystack:
    nc, nh = args["num_chains"], args["num_hops"]
    icl_vars, icl_chains = _chains(rng, nc, min(10, nh), k=3)
    names, chains = _chains(rng, nc, nh, k=5)

    def icl_build(n):
        return (*_vt_text(n, icl_chains, nh + 1, random.Random(place + "|icl")), ())
    icl_in, icl_prefix, _ = fit(Haystack(icl_build, nh + 1, BIG), VT_ICL_LENGTH - tokens_to_generate, count,
                                "vt's example")
    icl = " " + icl_in + icl_prefix + " " + " ".join(icl_vars[0]) + "\n\n" + "\n\n"

    def build(n):
        text, prefix = _vt_text(n, chains, nh + 1, random.Random(place))
        return icl + text, prefix, tuple(names[0])
    return Haystack(build, nh + 1, BIG)


# --- common_words_extraction.py
def common_words_extraction(args: dict[str, Any], rng: random.Random, place: str, length: int) -> Haystack:
    ncw, pool = args["num_cw"], data.word_pool()
    if length < 4096:  # RULER's short-context variant
        (ex_n, ex_c, ex_u), (fc, fu) = (20, 3, 1), (6, 1)
    else:
        (ex_n, ex_c, ex_u), (fc, fu) = (40, 10, 3), (args["freq_cw"], args["freq_ucw"])
    template, prefix = TEMPLATES["common_words_extraction"]
    numbered = lambda ws: " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

    def listing(words, c, u, seed):
        common, listed = words[:ncw], words[:ncw] * c + words[ncw:] * u
        random.Random(seed).shuffle(listed)
        return numbered(listed), tuple(common)

    ex_ctx, ex_ans = listing(rng.sample(pool, ex_n), ex_c, ex_u, place + "|example")
    example = template.format(context=ex_ctx) + prefix + numbered(ex_ans) + "\n"
    order = list(pool)
    rng.shuffle(order)

    def build(n):
        ctx, common = listing(order[:n], fc, fu, place)
        return example + template.format(context=ctx), prefix, common
    return Haystack(build, ncw, len(pool))


# --- freq_words_extraction.py
def _zeta(s: float, n: int = 32) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin), as scipy.special.zeta."""
    return (sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + n ** -s / 2
            + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720)


def freq_words_extraction(args: dict[str, Any], rng: random.Random, place: str, length: int) -> Haystack:
    alpha, size = args["alpha"], max(5, length // 50)  # vocab_size = max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."  # the top-ranked word is noise
    z = _zeta(alpha)
    counts = lambda n: [int(n * (k ** -alpha) / z) for k in range(1, size + 1)]
    template, prefix = TEMPLATES["freq_words_extraction"]

    def build(n):
        text = [w for w, c in zip(words, counts(n)) for _ in range(c)]
        random.Random(place).shuffle(text)
        return template.format(context=" ".join(text)), prefix, tuple(words[1:4])
    # from this size on, ranks 2-5 have distinct counts (>= 1): the answers are well defined
    n_min = math.ceil(z / (4 ** -alpha - 5 ** -alpha))
    return Haystack(build, n_min, BIG)


# --- qa.py
DOCUMENT = "Document {i}:\n{document}"


def qa(args: dict[str, Any], rng: random.Random, place: str, length: int, index: int) -> Haystack:
    qas, docs = data.qa_dataset(args["dataset"])
    if index >= len(qas):
        raise ValueError(f"index={index} is out of range for RULER's {args['dataset']} questions: "
                         f"allowed 0 <= index < {len(qas)}")
    q = qas[index]
    more = list(q.more)
    rng.shuffle(more)
    order, taken = list(q.context) + more, set(q.context) | set(q.more)
    template, prefix = TEMPLATES["qa"]
    extra = random.Random(place + "|distractors")

    def build(n):
        while len(order) < min(n, len(docs)):  # further random distractors, drawn in a fixed order
            d = extra.randrange(len(docs))
            if d not in taken:
                taken.add(d)
                order.append(d)
        picked = order[:n]
        random.Random(place).shuffle(picked)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(picked))
        return template.format(context=context, query=q.query), prefix, q.outputs
    return Haystack(build, q.n_gold, len(docs), skip=order.pop)


# --- the haystack-size search
def fit(hay: Haystack, length: int, count: Callable[[str], int], what: str, max_skips: int = 8):
    """`build(n)` for the largest n in [n_min, n_max] found whose `count(input + prefix) <= length`.

    Interpolation search with bisection fallback; `build(n)` grows roughly linearly in tokens
    with n, so a handful of tokenizations suffice. Only measured sizes are returned. With
    `hay.skip`, up to `max_skips` pieces too long for the room left are then dropped in turn and
    the following ones tried (qa: the next document may be ~1000 tokens).
    """
    build, n_min, n_max = hay.build, hay.n_min, hay.n_max
    best = build(n_min)
    c_lo = count(best[0] + best[1])
    if c_lo > length:
        raise ValueError(f"length={length} is too small for {what}: its smallest prompt is {c_lo} "
                         f"tokens, so length must be >= {c_lo}")
    lo, hi, c_hi = n_min, n_max + 1, None
    prev, c_prev, same_side, last = None, None, 0, None
    while hi - lo > 1:
        if c_hi is None:  # no upper bracket yet: extrapolate from the last two fitting sizes
            if prev is None or c_lo <= c_prev:
                p = lo + max(1, lo)
            else:
                p = lo + math.ceil((length - c_lo) * (lo - prev) / (c_lo - c_prev) * 1.02) + 1
        elif same_side >= 2:
            p = (lo + hi) // 2
        else:
            p = lo + round((length - c_lo) * (hi - lo) / max(1, c_hi - c_lo))
        p = min(max(p, lo + 1), hi - 1)
        out = build(p)
        c = count(out[0] + out[1])
        side = c <= length
        if side:
            prev, c_prev, lo, c_lo, best = lo, c_lo, p, c, out
        else:
            hi, c_hi = p, c
        same_side, last = (same_side + 1 if side == last else 1), side
    skips = 0
    while hay.skip is not None and skips < max_skips and lo < n_max:
        if hi == lo + 1:  # piece `lo` (0-based) is known not to fit
            hay.skip(lo)
            skips, n_max, hi = skips + 1, n_max - 1, n_max + 1
            continue
        out = build(lo + 1)
        if count(out[0] + out[1]) <= length:
            lo, best = lo + 1, out
        else:
            hi = lo + 1
    return best
