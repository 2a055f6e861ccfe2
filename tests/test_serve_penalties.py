"""The serving engine's logit adjustments (flexkv.serve.penalties): `presence_penalty`,
`frequency_penalty`, `repetition_penalty`, `logit_bias` and `min_tokens`.

- The engine's slot state (`SlotAdjustments`) equals, over requests coming and going, a reference
  built from transformers' own logits processors (`MinNewTokensLengthLogitsProcessor`,
  `SequenceBiasLogitsProcessor`, `RepetitionPenaltyLogitsProcessor`) and OpenAI's documented
  frequency / presence formula, applied in vLLM's order (hypothesis).
- Every token a request gets from the engine (greedy or sampled, policy full against
  transformers' model on the same fp64 weights, h2o against `flexkv.generate`'s logits for the
  same tokens) is the one chosen from the reference-adjusted logits of its step.
- Isolation: a slot that held a request with adjustments serves the next request as a fresh
  engine; a request without them beside one with them is unchanged; seeded sampling with them is
  the same alone and in a batch. Validation names the field and its range.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor)

import flexkv
from flexkv.serve import Engine, SamplingParams
from flexkv.serve.sampling import sample_slots
from helpers import hf_model

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny64(tiny_llama_dir):
    model, _ = flexkv.load_model(tiny_llama_dir, dtype=torch.float64)
    return model


@pytest.fixture(scope="module")
def hf64(tiny_llama_dir):
    return hf_model(tiny_llama_dir).double()


def reference(logits: torch.Tensor, prompt: list[int], produced: list[int], sp: SamplingParams,
              stop_ids) -> torch.Tensor:
    """One row's adjusted logits [V] before the next token, from transformers' processors and
    OpenAI's formula (mu[j] - c[j] * frequency - (c[j] > 0) * presence), in vLLM's order."""
    x = logits.clone()[None]
    seq = torch.tensor([prompt + produced])
    if stop_ids:
        x = MinNewTokensLengthLogitsProcessor(len(prompt), sp.min_tokens, sorted(stop_ids))(seq, x)
    if sp.logit_bias:
        x = SequenceBiasLogitsProcessor([[[i], float(b)] for i, b in sp.logit_bias.items()])(seq, x)
    if sp.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(seq, x)
    x = x[0]
    for j in set(produced):
        c = produced.count(j)
        x[j] -= c * sp.frequency_penalty + sp.presence_penalty
    return x


def params_strategy(V: int, max_tokens: int):
    return st.builds(
        SamplingParams, max_tokens=st.just(max_tokens),
        presence_penalty=st.sampled_from([0.0, -2.0, 0.7, 2.0]),
        frequency_penalty=st.sampled_from([0.0, -1.5, 0.4, 2.0]),
        repetition_penalty=st.sampled_from([1.0, 0.5, 1.3, 3.0]),
        logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, V - 1),
                                                        st.sampled_from([-100, -3.5, 2.0, 100]),
                                                        max_size=4)),
        min_tokens=st.integers(0, max_tokens))


@SETTINGS
@given(data=st.data())
def test_slot_state_equals_the_reference_over_requests_coming_and_going(data):
    """`SlotAdjustments` keeps its rows up to date by events (admission, each token, the ban
    lifted, the slot freed) instead of recomputing: after any sequence of them, every adjusted
    slot's row of `choose_logits` equals the reference (transformers' processors, OpenAI's
    formula) of that request's history, and a slot without adjustments is chosen from its raw
    logits."""
    from flexkv.serve.penalties import SlotAdjustments

    S, V, N = 3, 17, 6
    adj = SlotAdjustments(S, V, "cpu", torch.float64)
    live = {}                                  # slot -> (params, prompt, produced, stop ids)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    for _ in range(data.draw(st.integers(4, 16))):
        free = [s for s in range(S) if s not in live]
        action = data.draw(st.sampled_from(["admit", "step", "free"] if free else ["step", "free"]))
        if action == "admit":
            slot = data.draw(st.sampled_from(free))
            sp = data.draw(params_strategy(V, N))
            prompt = data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=6))
            stops = data.draw(st.frozensets(st.integers(0, V - 1), max_size=2))
            adj.admit(slot, sp, prompt, stops)
            first = int(torch.randint(0, V, (1,), generator=gen))
            adj.record(torch.tensor([first]), slot)
            live[slot] = (sp, prompt, [first], stops)
            adj.produced(slot, 1)
        elif action == "step" and live:
            tokens = torch.randint(0, V, (S,), generator=gen)
            adj.record(tokens)
            for slot, (_, _, produced, _) in live.items():
                produced.append(int(tokens[slot]))
                adj.produced(slot, len(produced))
        elif action == "free" and live:
            slot = data.draw(st.sampled_from(sorted(live)))
            adj.free(slot)
            del live[slot]
        logits = torch.randn(S, V, dtype=torch.float64, generator=gen)
        got = adj.choose_logits(logits)
        for slot in range(S):
            if slot not in live:
                assert torch.equal(got[slot], logits[slot])
                continue
            sp, prompt, produced, stops = live[slot]
            want = reference(logits[slot], prompt, produced, sp, stops)
            torch.testing.assert_close(got[slot], want, rtol=0, atol=1e-12)
            first = adj.choose_first(logits[slot:slot + 1], slot)
            assert torch.equal(first[0], got[slot])


def check_choices(handle, prompt, logits_at, stop_ids, V):
    """Each token of `handle` is the one chosen from the reference-adjusted logits of its step
    (`logits_at(i)`: the model's logits before token i, given the handle's tokens before it):
    the argmax, or `sample_slots` with the request's seed at step i."""
    sp, toks = handle.params, handle.tokens
    for i, tok in enumerate(toks):
        x = reference(logits_at(i), prompt, toks[:i], sp, stop_ids)
        if sp.temperature == 0:
            assert x[tok] >= x.max() - 1e-9, (i, tok, int(x.argmax()))
        else:
            one = lambda v, dt: torch.tensor([v], dtype=dt)  # noqa: E731
            want = sample_slots(x[None], one(sp.temperature, torch.float32), one(sp.top_k, torch.long),
                                one(sp.top_p, torch.float32), one(sp.seed, torch.long),
                                one(i, torch.long))
            assert int(want) == tok, (i, tok, int(want))
    if handle.finish_reason == "stop":        # stopped by a stop id, never before min_tokens
        assert len(toks) >= sp.min_tokens


def random_prompt(T, seed, V):
    return torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_engine_tokens_are_chosen_from_adjusted_logits(tiny64, hf64, data):
    V, N = tiny64.args.vocab_size, 8
    policy = data.draw(st.sampled_from(["full", "h2o"]))
    eng = Engine(tiny64, None, policy, budget=None if policy == "full" else 6, max_slots=2,
                 max_new_tokens=N, max_prompt_tokens=30)
    prompts = [random_prompt(data.draw(st.integers(3, 20)), data.draw(st.integers(0, 99)), V)
               for _ in range(3)]
    params = []
    for i in range(3):
        sp = data.draw(params_strategy(V, N))
        if data.draw(st.booleans()):
            sp.temperature, sp.top_k, sp.seed = 0.8, data.draw(st.sampled_from([0, 5])), i
        # a stop id that the unadjusted greedy run would produce early (min_tokens defers it)
        plain = eng.generate([prompts[i]], SamplingParams(max_tokens=N))[0]
        sp.stop_token_ids = (plain[data.draw(st.integers(0, 3))],)
        params.append(sp)
    handles = eng.submit_many(prompts, params)
    while eng.has_work():
        eng.step()
    for h, p in zip(handles, prompts):
        toks = h.tokens
        if policy == "full":   # transformers' model on the same weights
            with torch.no_grad():
                out = hf64(torch.tensor([p + toks])).logits[0, len(p) - 1:]
        else:                  # flexkv.generate alone, fed the engine's tokens
            out = flexkv.generate(tiny64, torch.tensor([p]), max_new_tokens=max(1, len(toks)),
                                  policy="h2o", budget=6, output_logits=True,
                                  forced_tokens=torch.tensor([toks or [0]])).logits[0]
        check_choices(h, p, lambda i: out[i], set(h.params.stop_token_ids) | eng.eos_ids, V)


def test_a_slot_after_adjustments_is_fresh_and_neighbours_are_untouched(tiny64):
    V = tiny64.args.vocab_size
    a, b = random_prompt(14, 1, V), random_prompt(9, 2, V)
    plain = SamplingParams(max_tokens=8)
    fresh = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=8, max_prompt_tokens=30)
    want_a, want_b = fresh.generate([a, b], plain)
    heavy = SamplingParams(max_tokens=8, presence_penalty=2.0, frequency_penalty=-2.0,
                           repetition_penalty=3.0, logit_bias={want_a[0]: -100, 5: 100},
                           min_tokens=8, stop_token_ids=tuple(set(want_a)))
    eng = Engine(tiny64, None, "h2o", budget=6, max_slots=2, max_new_tokens=8, max_prompt_tokens=30)
    got = eng.generate([a, b], [heavy, plain])            # a in slot 0, b in slot 1
    assert got[1] == want_b and got[0] != want_a          # beside it: unchanged
    # slot 0 again, with one (neutral) adjustment, beside a request with every kind (so the
    # step reads all of row 0's state): nothing of the previous request's ban, bias or
    # penalties is left in the slot
    # (the heavy request is cancelled before its min_tokens, so its ban is still on when it goes)
    unused = next(t for t in range(V) if t not in want_a + want_b)
    others = SamplingParams(max_tokens=8, repetition_penalty=1.3, logit_bias={7: 1.0}, min_tokens=8,
                            stop_token_ids=(unused,))
    for light in (dict(logit_bias={5: 0.0}), dict(frequency_penalty=1e-12),
                  dict(min_tokens=1, stop_token_ids=(unused,))):
        h = eng.submit(a, heavy)
        while len(h.tokens) < 3:
            eng.step()
        h.cancel()
        eng.step()
        assert h.finish_reason == "cancelled" and not eng.has_work()
        got = eng.generate([a, b], [SamplingParams(max_tokens=8, **light), others])
        assert got[0] == want_a, light
    assert eng.generate([a, b], plain) == [want_a, want_b]
    # seeded sampling with adjustments: the same alone and in a busy batch
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=7, frequency_penalty=1.0, logit_bias={3: 4.0})
    alone = Engine(tiny64, None, "h2o", budget=6, max_slots=1, max_new_tokens=8,
                   max_prompt_tokens=30).generate([a], sp)[0]
    assert eng.generate([b, a, b], [heavy, sp, plain])[1] == alone


@pytest.mark.parametrize("params, match", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=True), "frequency_penalty"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a number in \(0, 100\]"),
    (dict(repetition_penalty=101.0), "repetition_penalty"),
    (dict(logit_bias={101: 1.0}), r"logit_bias: token ids must be ints in \[0, 100\]"),
    (dict(logit_bias={"3": 1.0}), "logit_bias: token ids"),
    (dict(logit_bias={3: 101}), r"logit_bias: each bias must be a number in \[-100, 100\]"),
    (dict(logit_bias=[(3, 1.0)]), "logit_bias must be None or a dict"),
    (dict(min_tokens=5), r"min_tokens must be an int in \[0, max_tokens=4\]"),
    (dict(min_tokens=-1), "min_tokens"),
])
def test_bad_adjustments_name_the_field(tiny64, params, match):
    eng = Engine(tiny64, None, "full", max_slots=1, max_new_tokens=10, max_prompt_tokens=40)
    with pytest.raises(ValueError, match=match):
        eng.submit([1, 2], SamplingParams(max_tokens=4, **params))
    assert eng.metrics()["waiting"] == 0
