"""Per-request logit adjustments of the serving engine, applied to a slot's logits before its
token is chosen (the argmax, or the sampler's temperature, top-k and top-p), as vLLM applies them:

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
Logprobs (`SamplingParams.logprobs`) stay those of the raw logits, as vLLM reports by default.
"""
from __future__ import annotations

import torch
from torch import Tensor


def adjust_logits(logits: Tensor, ban: Tensor | None = None, bias: Tensor | None = None,
                  counts: Tensor | None = None, in_prompt: Tensor | None = None,
                  repetition: Tensor | None = None, frequency: Tensor | None = None,
                  presence: Tensor | None = None) -> Tensor:
    """logits [R, V] -> [R, V] (at least float32). ban, in_prompt: bool [R, V]; bias: float
    [R, V]; counts: int [R, V] (times each token was produced); repetition, frequency,
    presence: [R]. A None argument is that adjustment's neutral value."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    out = logits.to(dt)
    if ban is not None:
        out = out.masked_fill(ban, float("-inf"))
    if bias is not None:
        out = out + bias
    if repetition is not None:
        seen = in_prompt if counts is None else (in_prompt | (counts > 0))
        p = torch.where(seen, repetition[:, None].to(dt), 1.0)
        out = torch.where(out > 0, out / p, out * p)
    if counts is not None:
        c = counts.to(dt)
        out = out - frequency[:, None].to(dt) * c - presence[:, None].to(dt) * (c > 0).to(dt)
    return out


class SlotAdjustments:
    """The engine's per-slot state for `adjust_logits`: `admit` writes a slot's row, `choose_logits`
    gives the logits to choose from, `record` counts the tokens chosen, `produced` lifts the
    `min_tokens` ban, `free` forgets the slot. Host-side sets say which slots need what."""

    def __init__(self, slots: int, vocab: int, device):
        self.S, self.V, self.device = slots, vocab, device
        self._state: dict[str, Tensor] = {}
        self.ban: dict[int, int] = {}      # slot -> its min_tokens (banned until produced)
        self.bias: set[int] = set()
        self.penalty: set[int] = set()     # any of the three penalties
        self._rows: Tensor | None = None   # sorted(self.slots) on the device, cached
        self._penalty_rows: Tensor | None = None

    def _tensor(self, name: str, dtype) -> Tensor:
        t = self._state.get(name)
        if t is None:
            t = self._state[name] = torch.zeros(self.S, self.V, dtype=dtype, device=self.device)
        return t

    def _vector(self, name: str, fill: float) -> Tensor:
        t = self._state.get(name)
        if t is None:
            t = self._state[name] = torch.full((self.S,), fill, dtype=torch.float32, device=self.device)
        return t

    @property
    def slots(self) -> set[int]:
        return set(self.ban) | self.bias | self.penalty

    def _changed(self) -> None:
        self._rows = self._penalty_rows = None

    def admit(self, slot: int, params, prompt: list[int], stop_ids) -> None:
        """Write `slot`'s row for a request with `params` (a `SamplingParams`), its prompt ids and
        its stop token ids; a request without adjustments leaves no trace."""
        if params.min_tokens > 0 and stop_ids:
            ban = self._tensor("ban", torch.bool)
            ban[slot] = False
            ban[slot, torch.tensor(sorted(stop_ids), device=self.device)] = True
            self.ban[slot] = params.min_tokens
        if params.logit_bias:
            bias = self._tensor("bias", torch.float32)
            bias[slot] = 0.0
            ids, vals = zip(*sorted(params.logit_bias.items()))
            bias[slot, torch.tensor(ids, device=self.device)] = torch.tensor(
                vals, dtype=torch.float32, device=self.device)
            self.bias.add(slot)
        if params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty:
            self._tensor("counts", torch.int32)[slot] = 0
            in_prompt = self._tensor("in_prompt", torch.bool)
            in_prompt[slot] = False
            in_prompt[slot, torch.tensor(prompt, device=self.device)] = True
            for name, value, neutral in (("repetition", params.repetition_penalty, 1.0),
                                         ("frequency", params.frequency_penalty, 0.0),
                                         ("presence", params.presence_penalty, 0.0)):
                self._vector(name, neutral)[slot] = float(value)
            self.penalty.add(slot)
        self._changed()

    def rows(self) -> Tensor:
        if self._rows is None:
            self._rows = torch.tensor(sorted(self.slots), dtype=torch.long, device=self.device)
        return self._rows

    def adjusted(self, logits: Tensor, rows: Tensor, slots: list[int]) -> Tensor:
        """The adjusted logits [len(rows), V] of `logits` [len(rows), V], the rows of `slots`."""
        st = self._state
        pen = bool(self.penalty.intersection(slots))
        return adjust_logits(
            logits,
            ban=st["ban"][rows] if self.ban.keys() & set(slots) else None,
            bias=st["bias"][rows] if self.bias.intersection(slots) else None,
            counts=st["counts"][rows] if pen else None,
            in_prompt=st["in_prompt"][rows] if pen else None,
            **{k: st[k][rows] if pen else None for k in ("repetition", "frequency", "presence")})

    def choose_logits(self, logits: Tensor) -> Tensor:
        """The logits [S, V] to choose every slot's token from: `logits` itself where no slot has
        an adjustment, else a copy (at least float32) with the adjusted rows."""
        if not self.slots:
            return logits
        rows = self.rows()
        adjusted = self.adjusted(logits[rows], rows, sorted(self.slots))
        return logits.to(adjusted.dtype).index_put((rows,), adjusted)

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
                self._penalty_rows = torch.tensor(sorted(self.penalty), dtype=torch.long,
                                                  device=self.device)
            rows = self._penalty_rows
            tokens = tokens[rows]
        self._state["counts"].index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.int32),
                                         accumulate=True)

    def produced(self, slot: int, n: int) -> None:
        """`slot`'s request has produced `n` tokens: its `min_tokens` ban ends once n reaches it."""
        if slot in self.ban and n >= self.ban[slot]:
            self._state["ban"][slot] = False
            del self.ban[slot]
            self._changed()

    def free(self, slot: int) -> None:
        """`slot`'s request is done: its rows go back to neutral (a later request of the slot
        without adjustments may be chosen from them beside one with)."""
        if slot in self.ban:
            self._state["ban"][slot] = False
            del self.ban[slot]
        if slot in self.bias:
            self._state["bias"][slot] = 0.0
            self.bias.discard(slot)
        if slot in self.penalty:
            for name, neutral in (("repetition", 1.0), ("frequency", 0.0), ("presence", 0.0)):
                self._state[name][slot] = neutral
            self.penalty.discard(slot)
        self._changed()
