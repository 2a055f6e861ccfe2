"""flexkv.testing, the public property kit: the README's custom-policy example runs as written
(so it cannot rot), the kit catches a policy that disagrees with its reference or exceeds its
declared budget (a decode-time policy's, a prefill-only one's per head or on average, a decode
that does not append), the strategies reach budgets above the prompt and short padded rows,
bad arguments, and its ImportError without hypothesis."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
from hypothesis import Phase, find, settings
from hypothesis import strategies as st

from flexkv.testing import budgets, check_policy, prompts, tiny_model

# derandomized under CI only (conftest); the broken policies below fail on nearly every draw
NO_SHRINK = settings(deadline=None, database=None, phases=[Phase.generate])
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Checking a new policy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def readme_classes() -> dict:
    """The README example's namespace without its final check_policy call."""
    code = readme_example()
    ns = {"__name__": "readme_example"}
    exec(compile(code[:code.rindex("check_policy(")], str(README), "exec", dont_inherit=True), ns)
    return ns


def test_readme_example_runs():
    code = readme_example()
    assert "check_policy(KeyNorm, RefKeyNorm" in code
    namespace = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec", dont_inherit=True), namespace)  # raises if any property fails
    from flexkv.reference import _REFS
    assert "keynorm" not in _REFS  # the reference was registered for the check only


def test_kit_catches_a_reference_that_disagrees():
    ns = readme_classes()

    class WrongRef(ns["RefKeyNorm"]):  # keeps the SMALLEST norms at prefill
        def prefill_select(self, layer, b, heads, chunks, attn):
            return [h.take(sorted(h.k.norm(dim=-1).argsort()[:self.spec.budget].tolist()))
                    for h in heads]

    with pytest.raises(AssertionError, match="reference"):
        check_policy(ns["KeyNorm"], WrongRef, budget=st.integers(1, 6), properties=["reference"],
                     max_examples=5, settings=NO_SHRINK)


def test_kit_catches_a_budget_violation():
    ns = readme_classes()

    class Leaky(ns["KeyNorm"]):  # room for every new token, so decode never evicts
        def capacity(self, layer, prompt_len, max_new_tokens):
            return min(self.budget, prompt_len) + max_new_tokens

        def layer_budget(self, layer, prompt_len, max_new_tokens, capacity):
            return capacity

    with pytest.raises(AssertionError, match="retained more than the budget"):
        check_policy(Leaky, properties=["budget"], budget=st.integers(1, 6), max_examples=5,
                     settings=NO_SHRINK)


def prefill_only(ns, layer_budget):
    """The README's KeyNorm as a prefill-only selection (decode appends) keeping
    `layer_budget(policy, layer, prompt_len, capacity)` tokens per head of each layer."""

    class PrefillOnly(ns["KeyNorm"]):
        decode_evicts = False

        def layer_budget(self, layer, prompt_len, max_new_tokens, capacity):
            return layer_budget(self, layer, prompt_len, capacity)

    return PrefillOnly


# per layer: the budget (correct), the base's default for a prefill-only policy (its capacity:
# budget + the decode room, kept at prefill), one more in layer 0 and one less in layer 1
# (uneven, the same average), one more in layer 0 only (over on average)
EXACT = lambda p, layer, T, cap: min(p.budget, T)  # noqa: E731
CAPACITY = lambda p, layer, T, cap: cap  # noqa: E731
UNEVEN = lambda p, layer, T, cap: min(p.budget + (1 if layer == 0 else -1), T)  # noqa: E731
OVER = lambda p, layer, T, cap: min(p.budget + (1 if layer == 0 else 0), T)  # noqa: E731


@pytest.mark.parametrize("layer_budget, varying, match", [
    (EXACT, False, None), (CAPACITY, False, "retained more than the budget"),
    (UNEVEN, False, "retained more than the budget"), (UNEVEN, True, None),
    (OVER, True, "per head on average"),
], ids=["exact", "capacity", "uneven", "uneven-varying", "over-varying"])
def test_kit_holds_a_prefill_only_policy_to_its_budget(layer_budget, varying, match):
    policy = prefill_only(readme_classes(), layer_budget)
    kw = dict(properties=["budget"], budget=st.integers(2, 6), varying_budgets=varying,
              max_examples=8, model_strategy=st.just(tiny_model()), settings=NO_SHRINK)
    if match is None:
        check_policy(policy, **kw)
    else:
        with pytest.raises(AssertionError, match=match):
            check_policy(policy, **kw)


def test_kit_catches_a_prefill_only_decode_that_evicts():
    from flexkv.policies.base import lowest

    class Forgetful(prefill_only(readme_classes(), EXACT)):  # drops its oldest token each step
        def decode_after(self, ctx):
            ctx.lc.evict(lowest(ctx.lc.pos.float(), ctx.lc.pos),
                         ctx.active[:, None].expand_as(ctx.slot))

    with pytest.raises(AssertionError, match="did not append exactly one token"):
        check_policy(Forgetful, properties=["budget"], budget=st.integers(1, 6), max_examples=5,
                     settings=NO_SHRINK)


def test_strategies_and_models():
    m = tiny_model(1, 2, 1, 16)
    assert (m.args.num_hidden_layers, m.args.num_key_value_heads) == (1, 1)
    assert tiny_model(1, 2, 1, 16) is m  # cached
    ids, mask, pad = find(prompts(), lambda p: p[2] > 0)  # a padded batch
    assert ids.shape[0] == 2 and 8 <= ids.shape[1] <= 40
    assert mask[1, :pad].eq(0).all() and mask[1, pad:].eq(1).all() and mask[0].eq(1).all()
    ids, mask, pad = find(prompts(), lambda p: p[0].shape[1] - p[2] < p[0].shape[1] // 2)
    assert ids.shape[1] - pad >= 4  # a short row next to a long one (at least 4 real tokens)
    assert find(budgets(10), lambda b: b >= 10) == 10  # eviction starting mid-decode
    assert find(budgets(10, low=3), lambda b: b < 10) == 3  # compressed at prefill


@pytest.mark.parametrize("kw, match", [
    (dict(properties=["speed"]), "properties: unknown \\['speed'\\]"),
    (dict(), "policy must be a Policy subclass or a registered name"),
])
def test_bad_arguments(kw, match):
    policy = object if not kw else "h2o"
    with pytest.raises(ValueError, match=match):
        check_policy(policy, **kw)


def test_import_error_without_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import flexkv.testing\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "flexkv.testing needs hypothesis" in out.stdout


def test_kit_draws_prefill_only_for_a_decode_time_policy():
    """A policy that evicts at decode gets `prefill_only` from the base class: the README's
    KeyNorm passes with the flag drawn, and one whose decode ignores the flag (it keeps evicting)
    is caught against the reference, which appends."""
    ns = readme_classes()
    check_policy(ns["KeyNorm"], ns["RefKeyNorm"], budget=st.integers(1, 6),
                 prefill_only=st.booleans(), max_examples=8, settings=NO_SHRINK)

    class Deaf(ns["KeyNorm"]):
        @property
        def evicts_at_decode(self):
            return self.decode_evicts

    with pytest.raises(AssertionError, match="reference"):
        check_policy(Deaf, ns["RefKeyNorm"], budget=st.integers(1, 4), prefill_only=True,
                     properties=["reference"], max_examples=5, settings=NO_SHRINK)
