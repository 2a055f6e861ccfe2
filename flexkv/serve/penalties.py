"""Per-request logit adjustments of the serving engine, applied to a slot's logits before its
token is chosen (the argmax, or the sampler's temperature, top-k and top-p), as vLLM applies them.
First, structured output (`response_format` "json_object" or "json_schema"): every token that
cannot continue the request's JSON value is banned (-inf; `flexkv.serve.json_mode`; once the
value is complete, everything but its stop tokens and what may still continue it); the host
advances the request's recognizer by each token it produces (the engine reads the tokens
anyway) and marks its row of the mask stale; the row is written when logits are next chosen
from (`choose_logits`, after the engine has launched the next decode step: on a GPU the host's
walk for a new state overlaps the step's kernels instead of delaying their launch), counting the
time that takes: past the engine's `max_mask_seconds` (default `MAX_MASK_SECONDS`) it ends the
request (`over_budget`), since every other request waits on that thread.
Then:

1. `min_tokens` (vLLM's): the request's stop token ids (end-of-sequence included unless
   `ignore_eos`) are banned (-inf) until it has produced `min_tokens` tokens;
2. `logit_bias` (OpenAI's): a per-token number in [-100, 100] added to the logit;
3. `repetition_penalty` p (vLLM's and transformers'): a token seen in the prompt or the output
   so far has its logit divided by p where positive, multiplied by p where not;
   `frequency_penalty` f and `presence_penalty` r (OpenAI's): a token produced c times so far has
   f * c + r * (c > 0) subtracted.

The state is one row per slot (`[S, V]` tensors, each allocated the first time a request needs
it) written at admission and after each step on the device, without a host sync; the host knows
which slots need which adjustment, so a step where no request asked for one costs nothing.
tests/test_serve_penalties.py checks it against transformers' logits processors and OpenAI's
formula.
Logprobs (`SamplingParams.logprobs`) stay those of the raw logits, as vLLM reports by default.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from flexkv.serve.json_mode import MAX_WS_RUN, JsonRequest

MAX_MASK_SECONDS = 10.0   # the default of the engine's time one structured request may take for
                          # its recognizer and masks, all told (the other requests wait on it)
OVER_BUDGET = "structured output: "   # how the error of a request ended for it begins


def over_budget_error(seconds: float = MAX_MASK_SECONDS) -> str:
    return (f"{OVER_BUDGET}the schema's token masks took more than {seconds:g} s of the "
            "engine's time for this request (its patterns or alternatives kept reaching new "
            "states), so it was ended, for the other requests to go on; a simpler schema, or "
            "fewer distinct patterns, stays within it")


class SlotAdjustments:
    """The engine's per-slot state, kept so that a step applies the adjustments above in at most
    six passes over the logits: `add` [S, V] (the bias, -inf where banned), `rep` [S, V] (the
    repetition penalty where the token was seen, else 1), `sub` [S, V] (frequency * count +
    presence where produced), each allocated the first time a request needs it and updated on
    events (admission, a token produced, the ban lifted, the slot freed), never per step. A
    slot's rows are neutral (0, 1, 0) whenever it holds no request with that adjustment, so a
    step adjusts all slots at once, without gathering rows. `admit` writes a slot's rows,
    `choose_logits` / `choose_first` give the logits to choose from, `record` counts the tokens
    chosen, `produced` lifts the `min_tokens` ban, `free` makes the rows neutral again."""

    def __init__(self, slots: int, vocab: int, device, dtype=torch.float32, json_vocab=None,
                 max_mask_seconds: float = MAX_MASK_SECONDS):
        self.S, self.V, self.device = slots, vocab, device
        self.max_mask_seconds = max_mask_seconds
        self._json_vocab = json_vocab       # () -> JsonVocab, for JSON mode (built once, lazily)
        self._json: dict[int, tuple] = {}   # slot -> (its JsonRequest, its stop ids)
        self._stale: set[int] = set()       # JSON slots whose mask row trails their state
        self.dtype = torch.promote_types(dtype, torch.float32)
        self._state: dict[str, Tensor] = {}
        self._ban: dict[int, tuple] = {}    # slot -> (min_tokens, its stop ids) while banned
        self._bias: dict[int, tuple] = {}   # slot -> (ids, values) of its logit_bias
        self.penalty: set[int] = set()      # slots with any of the three penalties
        self._penalty_rows: Tensor | None = None

    def _tensor(self, name: str, fill: float, dtype=None) -> Tensor:
        t = self._state.get(name)
        if t is None:
            t = self._state[name] = torch.full((self.S, self.V), fill, dtype=dtype or self.dtype,
                                               device=self.device)
        return t

    def _vector(self, name: str, fill: float) -> Tensor:
        t = self._state.get(name)
        if t is None:
            t = self._state[name] = torch.full((self.S,), fill, dtype=self.dtype, device=self.device)
        return t

    @property
    def slots(self) -> set[int]:
        return set(self._ban) | set(self._bias) | self.penalty | set(self._json)

    def _ids(self, ids) -> Tensor:
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.device)

    def _write_add(self, slot: int) -> None:
        """`slot`'s add row from its bias and (while on) its ban."""
        add = self._tensor("add", 0.0)
        add[slot] = 0.0
        if slot in self._bias:
            ids, vals = self._bias[slot]
            add[slot, ids] = vals
        if slot in self._ban:
            add[slot, self._ban[slot][1]] = float("-inf")

    def _write_allow(self, slot: int) -> None:
        """`slot`'s row of the JSON mask: the tokens that may continue its value. Once the
        value is complete, its stop ids and the tokens that continue it without whitespace (a
        top-level number's digits; none after an object); whitespace instead while no stop id can
        be chosen (none under `ignore_eos`, or `min_tokens` not reached); whitespace tokens are
        banned after a run of `MAX_WS_RUN` structural whitespace bytes."""
        req, stops = self._json[slot]
        vocab = self._json_vocab()         # (its tables, built once, are not this request's time)
        start = time.perf_counter()
        allow = self._tensor("allow", True, torch.bool)
        if req.done and len(stops) and slot not in self._ban:
            rest = req.open_threads
            allow[slot] = vocab.allowed(req.grammar, rest)[0] if rest else False
            allow[slot, stops] = True
        else:
            mask, some = vocab.allowed(req.grammar, req.state)
            if not req.done and req.ws_run >= MAX_WS_RUN:
                mask = mask & ~vocab.ws_start
            allow[slot] = mask
            if req.done or not some:
                allow[slot, stops] = True
        req.seconds += time.perf_counter() - start

    def _refresh(self, slots) -> None:
        """Write the stale JSON mask rows among `slots`."""
        for slot in sorted(self._stale.intersection(slots)):
            self._stale.discard(slot)
            self._write_allow(slot)

    def over_budget(self, slot: int) -> bool:
        """Whether `slot`'s structured request has taken more than `max_mask_seconds` of the
        engine's time for its recognizer and masks (a schema whose states keep needing new
        masks: the engine ends it, so that the other requests go on)."""
        return slot in self._json and self._json[slot][0].seconds > self.max_mask_seconds

    def admit(self, slot: int, params, prompt: list[int], stop_ids) -> None:
        """Write `slot`'s rows for a request with `params` (a `SamplingParams`), its prompt ids and
        its stop token ids; a request without adjustments leaves them neutral."""
        if params.logit_bias:
            ids, vals = zip(*sorted(params.logit_bias.items()))
            self._bias[slot] = (torch.tensor(ids, dtype=torch.long, device=self.device),
                                torch.tensor(vals, dtype=self.dtype, device=self.device))
        if params.min_tokens > 0 and stop_ids:
            self._ban[slot] = (params.min_tokens, self._ids(stop_ids))
        if slot in self._bias or slot in self._ban:
            self._write_add(slot)
        rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
        if rep != 1:
            self._tensor("rep", 1.0)[slot, self._ids(set(prompt))] = float(rep)
        if freq or pres:
            self._tensor("counts", 0, torch.int32)[slot] = 0
        grammar = params.grammar()
        if grammar is not None:
            self._json[slot] = (JsonRequest(grammar), self._ids(stop_ids))
            self._write_allow(slot)
        if rep != 1 or freq or pres:
            for name, value, neutral in (("repetition", rep, 1.0), ("frequency", freq, 0.0),
                                         ("presence", pres, 0.0)):
                self._vector(name, neutral)[slot] = float(value)
            self.penalty.add(slot)
            self._penalty_rows = None

    def _apply(self, out: Tensor, rows: slice) -> Tensor:
        st = self._state
        if "allow" in st:
            out = out.masked_fill(~st["allow"][rows], float("-inf"))
        if "add" in st:
            out += st["add"][rows]
        if "rep" in st:
            rep = st["rep"][rows]
            out = torch.where(out > 0, out / rep, out * rep)
        if "sub" in st:
            out -= st["sub"][rows]
        return out

    def choose_logits(self, logits: Tensor) -> Tensor:
        """The logits [S, V] to choose every slot's token from: `logits` itself where no slot has
        an adjustment, else an adjusted copy (at least float32). Stale mask rows are written
        first (the engine calls this after launching the step that made `logits`)."""
        if not self.slots:
            return logits
        self._refresh(self._stale)
        return self._apply(logits.to(self.dtype, copy=True), slice(None))

    def choose_first(self, logits: Tensor, slot: int) -> Tensor:
        """The logits [1, V] to choose `slot`'s first token from (its prompt's last logits)."""
        if slot not in self.slots:
            return logits
        self._refresh((slot,))
        return self._apply(logits.to(self.dtype, copy=True), slice(slot, slot + 1))

    def record(self, tokens: Tensor, slot: int | None = None) -> None:
        """The tokens just chosen count as produced for the penalised slots: `tokens` [S] (a
        decode step), or `tokens` [1] of `slot` (a request's first token)."""
        if slot is not None:
            if slot not in self.penalty:
                return
            rows = torch.tensor([slot], dtype=torch.long, device=self.device)
        elif not self.penalty:
            return
        else:
            if self._penalty_rows is None:
                self._penalty_rows = self._ids(self.penalty)
            rows = self._penalty_rows
            tokens = tokens[rows]
        st = self._state
        if "rep" in st:         # seen now: its factor is the row's penalty (1 where none)
            st["rep"].index_put_((rows, tokens), st["repetition"][rows])
        if "counts" in st:      # sub = frequency * count + presence, where produced
            counts = st["counts"]
            counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32), accumulate=True)
            sub = self._tensor("sub", 0.0)
            sub.index_put_((rows, tokens), st["frequency"][rows] * counts[rows, tokens]
                           + st["presence"][rows])

    def advance(self, slot: int, token: int) -> None:
        """`slot` produced `token` (not a stop token): its JSON recognizer takes the token's
        bytes, and its mask row is written at the next choice (`choose_logits`); a token without
        bytes (a special one) changes nothing."""
        if slot not in self._json:
            return
        data = self._json_vocab().bytes_of.get(token)
        req, start = self._json[slot][0], time.perf_counter()
        moved = bool(data) and req.advance(data)         # (the mask let only such tokens through)
        req.seconds += time.perf_counter() - start
        if moved:
            self._stale.add(slot)

    def produced(self, slot: int, n: int) -> None:
        """`slot`'s request has produced `n` tokens: its `min_tokens` ban ends once n reaches it."""
        if slot in self._ban and n >= self._ban[slot][0]:
            del self._ban[slot]
            self._write_add(slot)
            if slot in self._json:    # a complete object may end now
                self._stale.add(slot)

    def free(self, slot: int) -> None:
        """`slot`'s request is done: its rows go back to neutral (a later request in the slot
        is adjusted beside others from them)."""
        if self._json.pop(slot, None) is not None:
            self._state["allow"][slot] = True
            self._stale.discard(slot)
        had_add = slot in self._ban or slot in self._bias
        self._ban.pop(slot, None)
        self._bias.pop(slot, None)
        if had_add:
            self._state["add"][slot] = 0.0
        if slot in self.penalty:
            st = self._state
            for name, neutral in (("rep", 1.0), ("sub", 0.0), ("repetition", 1.0),
                                  ("frequency", 0.0), ("presence", 0.0)):
                if name in st:
                    st[name][slot] = neutral
            self.penalty.discard(slot)
            self._penalty_rows = None
