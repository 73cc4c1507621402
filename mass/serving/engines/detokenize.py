"""One sequence's text as its tokens arrive: incremental detokenisation (``tokenizers``' ``DecodeStream``, one
decode step per token, as vLLM does) and the stop strings, with the hold-back that keeps a stop string's
first characters from being streamed before it is known whether they start one."""

from __future__ import annotations


class TextStream:
    """The text of one sequence: ``push`` each generated token, then ``release`` what may be sent.

    Args:
        tokenizer: an HF tokenizer; a fast one decodes through ``DecodeStream``, a slow one through a short
            window of recent tokens (two decodes per token).
        stop: strings that end the text (they are not part of it).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # the slow path's window
        self._prefix = self._read = 0
        self.text = ""  # complete characters decoded so far
        self.sent = 0  # characters of ``text`` already released
        self._hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> None:
        """Decode one more token (characters it completes join ``text``)."""
        if self.backend is not None:
            self.text += self._stream.step(self.backend, token) or ""
            return
        self._ids.append(token)
        prefix = self.tokenizer.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):  # not half of a multi-byte character
            self._prefix, self._read = self._read, len(self._ids)
            self.text += full[len(prefix):]

    def replay(self, tokens: list[int], sent: int) -> None:
        """Resume a text whose ``tokens`` were decoded elsewhere and whose first ``sent`` characters were
        released there (the rest, held back, is decided again by the next ``release``)."""
        for token in tokens:
            self.push(token)
        self.sent = min(max(0, sent), len(self.text))

    def release(self, finishing: bool = False) -> tuple[str, bool]:
        """(text that may be sent now, whether a stop string ended the text). Unless ``finishing``, the
        last characters that could begin a stop string are held back until the next token decides."""
        end, stopped = len(self.text), False
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1 and at < end:
                end, stopped = at, True
        if not (stopped or finishing):
            end = max(self.sent, end - self._hold)
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta, stopped
