"""TextStream: token-by-token text equals the whole decode (multi-byte characters never split), and stop
strings end the text without ever being streamed, on the DecodeStream path and the slow-tokenizer path."""

from __future__ import annotations

import pytest

from mass.serving.engines.detokenize import TextStream

TEXT = "Return the héllo wörld ✓ value; stop here and never after"


@pytest.fixture(scope="module")
def tok(lm):
    return lm[1]


class SlowTokenizer:
    """A tokenizer without a Rust backend (as a slow HF tokenizer is): only ``decode``."""

    def __init__(self, fast) -> None:
        self.decode = fast.decode


@pytest.mark.parametrize("slow", [False, True], ids=["decode-stream", "slow-window"])
def test_streamed_text_is_the_whole_decode(tok, slow):
    stream = TextStream(SlowTokenizer(tok) if slow else tok)
    ids, parts = tok(TEXT)["input_ids"], []
    for token in ids:
        stream.push(token)
        parts.append(stream.release()[0])
        assert "\ufffd" not in parts[-1]
    assert "".join(parts) + stream.release(finishing=True)[0] == tok.decode(ids) == TEXT


@pytest.mark.parametrize("slow", [False, True], ids=["decode-stream", "slow-window"])
def test_stop_strings_end_the_text_and_are_never_released(tok, slow):
    stream = TextStream(SlowTokenizer(tok) if slow else tok, stop=("stop here", "zzz"))
    released, stopped = "", False
    for token in tok(TEXT)["input_ids"]:
        stream.push(token)
        delta, stopped = stream.release()
        released += delta
        assert "stop" not in released
        if stopped:
            break
    assert stopped and released == TEXT[:TEXT.index("stop here")]
