"""Passkey-retrieval prompts (the classic long-context needle test), shared by `flexkv demo` and
the quality benchmark.

A pass key sentence (the *needle*) is hidden at a chosen relative depth of a haystack of
repeated filler sentences; the model is asked for the key. The haystack is sized so that the
whole prompt (chat template, intro, haystack, needle, question, answer prefix) is about
`n_tokens` tokens long.
"""
from __future__ import annotations

import random
import re

import torch

DEFAULT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
                  "Here we go. There and back again.")
DEFAULT_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize them. I will quiz you about the important information there.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_DIGITS = re.compile(r"\d+")


def random_key(rng=None) -> str:
    """A random 5-digit key (10000-99999) as a string.

    `rng` may be a `random.Random`, a `numpy.random.Generator`, a `torch.Generator`, an int seed
    or None (fresh entropy)."""
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        rng = random.Random(rng)
    if isinstance(rng, torch.Generator):
        return str(int(torch.randint(10000, 100000, (1,), generator=rng)))
    if hasattr(rng, "randint"):            # random.Random (and numpy's legacy RandomState: high excl.)
        if type(rng).__module__.startswith("numpy"):
            return str(int(rng.randint(10000, 100000)))
        return str(rng.randint(10000, 99999))
    if hasattr(rng, "integers"):           # numpy.random.Generator
        return str(int(rng.integers(10000, 100000)))
    raise ValueError(f"rng must be a random.Random, numpy Generator, torch.Generator, int seed or "
                     f"None, got {type(rng).__name__}")


def extract_answer(text: str) -> str:
    """The first run of digits in `text` ('' if there is none)."""
    m = _DIGITS.search(text or "")
    return m.group(0) if m else ""


def _units(filler: str) -> list[str]:
    units = [u.strip() for u in _SENTENCE_END.split(filler.strip()) if u.strip()]
    return units or [filler.strip()]


def _haystack(units: list[str], n_units: int, depth: float, needle: str) -> str:
    filler = [units[i % len(units)] for i in range(n_units)]
    cut = int(round(depth * n_units))
    return " ".join(filler[:cut] + [needle] + filler[cut:])


def _render(tokenizer, haystack: str, chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": f"{INTRO}\n{haystack}\n{QUESTION}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    text = f"{INTRO}\n{haystack}\n{QUESTION} {ANSWER_PREFIX}"
    return tokenizer(text)["input_ids"]


def build_passkey_prompt(tokenizer, n_tokens: int, depth: float, key, filler: str | None = None,
                         needle: str | None = None, chat: bool = False):
    """Build a passkey-retrieval prompt of about `n_tokens` tokens.

    Returns `(input_ids, answer)`: a LongTensor `[1, T]` (CPU) and the key as a string.

    - `depth`: relative position of the needle in the haystack, 0.0 = before the first filler
      sentence, 1.0 = after the last (it is placed at a sentence boundary).
    - `key`: the pass key (str or int), substituted for `{key}` in `needle`.
    - `filler`: haystack text, repeated sentence by sentence (default: the classic "The grass is
      green. ..."). `needle` (default "The pass key is {key}. Remember it. {key} is the pass key.").
    - `chat=False` (default): the classic plain-text prompt (Landmark Attention / LongLoRA):
      intro, haystack, and "What is the pass key? The pass key is" on separate lines, with the
      tokenizer's default special tokens; the model continues with the digits.
    - `chat=True` (needs a tokenizer with a chat template): the user message is intro + haystack +
      "What is the pass key?", the template's generation prompt is added, and the assistant's
      answer is **prefilled** with "The pass key is", so the model's first generated tokens should
      be the digits (no preamble to parse, a few new tokens suffice).

      Why plain is the default: SmolLM2-135M-Instruct (the default model, full cache, greedy, HF
      transformers) answered 5/5 plain prompts of 4096 tokens at depths 0.1/0.3/0.5/0.7/0.9 but
      0/5 of the same with `chat=True` (it describes "a magical item" instead).

    The length is matched by adding/removing whole filler sentences; T is within a few % of
    `n_tokens` (within one sentence, ~5 tokens, for the default filler). Raises ValueError naming
    the argument for bad input (n_tokens smaller than the fixed text, depth outside [0, 1], ...).
    """
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("tokenizer must be a Hugging Face tokenizer (the model directory has none?)")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int):
        raise ValueError(f"n_tokens must be an int, got {n_tokens!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end of the haystack), "
                         f"got {depth!r}")
    if key is None or isinstance(key, bool) or str(key).strip() == "":
        raise ValueError(f"key must be a non-empty str or int, got {key!r}")
    answer = str(key).strip()
    filler = DEFAULT_FILLER if filler is None else filler
    if not isinstance(filler, str) or not filler.strip():
        raise ValueError(f"filler must be None or a non-empty string, got {filler!r}")
    needle = DEFAULT_NEEDLE if needle is None else needle
    if not isinstance(needle, str) or "{key}" not in needle:
        raise ValueError(f"needle must be a string containing '{{key}}', got {needle!r}")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template; this one has none "
                         "(pass chat=False)")
    needle_text = needle.replace("{key}", answer)
    units = _units(filler)

    fixed = len(_render(tokenizer, needle_text, chat))   # no filler at all
    # tokens per filler sentence, measured on a long run (joins merge across boundaries)
    probe = 8 * len(units)
    per_unit = max(1e-3, (len(_render(tokenizer, _haystack(units, probe, 0.0, needle_text), chat))
                          - fixed) / probe)
    if n_tokens < fixed + per_unit:
        raise ValueError(f"n_tokens must be >= {int(fixed + per_unit + 0.999)} (the template, "
                         f"intro, needle and question alone take {fixed} tokens), got {n_tokens}")

    n_units = max(1, int(round((n_tokens - fixed) / per_unit)))
    best = None
    seen = set()
    for _ in range(8):
        if n_units in seen:
            break
        seen.add(n_units)
        ids = _render(tokenizer, _haystack(units, n_units, depth, needle_text), chat)
        err = len(ids) - n_tokens
        if best is None or abs(err) < abs(best[0]):
            best = (err, ids)
        if err == 0:
            break
        step = int(round(-err / per_unit)) or (-1 if err > 0 else 1)
        n_units = max(1, n_units + step)
    return torch.tensor([best[1]], dtype=torch.long), answer
