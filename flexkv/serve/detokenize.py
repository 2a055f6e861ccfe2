"""Incremental detokenization with stop strings, one request at a time: what the HTTP layer
(`flexkv.serve.api`) turns the engine's token ids into before sending them."""
from __future__ import annotations


class IncrementalText:
    """Token ids in, text out, for one request. Each new id is decoded together with the few ids
    before it (vLLM's incremental detokenization: the text of `ids[prefix:]` minus that of
    `ids[prefix:read]`, so word-initial spaces and byte-level merges come out as a whole decode
    would give them, at a cost per token that does not grow with the output). Held back: an
    incomplete character (a trailing U+FFFD) and any tail that could be the start of a stop
    string. At the first stop string the text is cut before it and `stopped` is set; `finish()`
    releases the rest. With `min_tokens` m, a stop string counts only where it ends after the text
    of the first m tokens (vLLM's `min_tokens`: no stop before m tokens)."""

    def __init__(self, tokenizer, stop=(), min_tokens: int = 0):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.maxstop = max((len(s) for s in self.stop), default=0)
        self.min_tokens = min_tokens
        self._floor = 0 if min_tokens == 0 else None  # a stop must end after text[:floor]
        self.ids: list[int] = []
        self.text = ""          # the text of ids[:read] (complete characters), cut at a stop
        self.sent = 0           # characters of `text` released
        self.stopped = False
        self._prefix = 0        # ids[prefix:read]: the context decoded before the new ids
        self._read = 0

    @staticmethod
    def decode_all(tokenizer, ids) -> str:
        """The text of `ids` as the incremental decode gives it (special tokens skipped)."""
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode(self, ids) -> str:
        return self.decode_all(self.tok, ids)

    def _advance(self, final: bool = False) -> None:
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _held(self, text: str) -> int:
        for k in range(min(len(text), self.maxstop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text that can be sent now (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self._advance()
        if self.stop:
            if self._floor is None:
                if len(self.ids) < self.min_tokens:
                    return self._release(len(self.text) - self._held(self.text))
                self._floor = len(self.text)
            start = max(0, self.sent - self.maxstop)
            hits = [i for i in (self.text.find(s, max(start, self._floor - len(s) + 1))
                                for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held(self.text))
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out

    def finish(self) -> str:
        """Everything not yet released: the held-back tail and an incomplete last character."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(len(self.text))

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


class TokenPieces:
    """Each token id's own text and bytes, for logprobs (cached per id). The text is the id
    decoded alone (a SentencePiece word-initial "▁" kept as a space); the bytes are the token's
    exact bytes where the tokenizer says them (byte-level BPE, `<0xNN>` byte fallback), else
    the text's UTF-8, or None for a text that is only part of a character."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int] | None] = {}
        self._byte_of = _byte_level_decoder()

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self.tok.decode([token_id], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
            piece = self.tok.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece.startswith("\u2581") and not s.startswith(" "):
                s = " " + s
            self._text[token_id] = s
        return s

    def bytes(self, token_id: int) -> list[int] | None:
        if token_id in self._bytes:
            return self._bytes[token_id]
        text, piece = self.text(token_id), self.tok.convert_ids_to_tokens(token_id)
        out = None
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                out = [int(piece[3:5], 16)]
            except ValueError:
                out = None
        if out is None and isinstance(piece, str) and piece and all(c in self._byte_of for c in piece):
            raw = bytes(self._byte_of[c] for c in piece)
            if raw.decode("utf-8", errors="replace") == text:   # the tokenizer is byte-level
                out = list(raw)
        if out is None and "\ufffd" not in text:
            out = list(text.encode("utf-8"))
        self._bytes[token_id] = out
        return out


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
