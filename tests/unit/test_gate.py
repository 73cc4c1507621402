"""The compression gate: parsed before any work starts, evaluated without eval, explained when it refuses."""

from __future__ import annotations

import pytest

from mass.compression.gate import DEFAULT_GATE, Gate
from mass.errors import ConfigError


def test_the_default_gate_wants_quality_and_a_gain_in_speed_or_memory():
    gate = Gate.parse(None)
    assert gate.text == DEFAULT_GATE
    assert gate.check({"quality": 0.99, "speedup": 2.0, "memory": 1.0})[0]
    assert gate.check({"quality": 0.99, "speedup": 1.0, "memory": 0.3})[0]
    passed, why = gate.check({"quality": 0.95, "speedup": 3.0, "memory": 0.3})
    assert not passed and "quality=0.95" in why and "speedup=3.0" in why
    assert not gate.check({"quality": 0.99, "speedup": 1.0, "memory": 1.0})[0]


def test_a_custom_gate_chains_comparisons_and_a_missing_figure_fails():
    gate = Gate.parse("quality>=0.98 and 1.5 <= speedup < 100")
    assert gate.check({"quality": 0.98, "speedup": 1.5})[0]
    assert not gate.check({"quality": 0.99, "speedup": 1.4})[0]
    assert not Gate.parse("top10 >= 0.9").check({"quality": 1.0})[0]


@pytest.mark.parametrize("text, needle", [
    ("quality >=", "does not parse"),
    ("quality >= 0.98 and speed > 2", "names 'speed'; figures: quality, top10"),
    ("__import__('os').system('x') > 0", "numbers only"),
    ("quality == 1", "only comparisons"),
    ("quality >= top10 + 0.1", "numbers only"),
    ("quality >= True", "numbers only"),
    ("not quality > 1", "only comparisons"),
])
def test_a_gate_that_does_not_parse_is_refused_naming_the_problem(text, needle):
    with pytest.raises(ConfigError, match=needle):
        Gate.parse(text)


def test_a_causal_card_reads_perplexity_as_quality_and_its_gate_can_name_it():
    """A causal LM's card: quality is the parent's perplexity over the child's, ``perplexity`` their ratio, the
    table speaks of tokens and perplexity, and a gate on perplexity decides."""
    from mass.compression.card import Card, Row

    def row(label, ppl, speed, weights, prefill=20_000.0):
        return Row(label, "torch", "float32", weights, weights, 10_000_000, 1.0, speed, (speed, speed),
                   quality=round(100.0 / ppl, 4), perplexity=ppl, unit="tokens", prefill=prefill,
                   prefill_range=(prefill - 500, prefill + 500))

    card = Card("tiny-gpt/1", "bnb-nf4", {}, [row("parent fp32", 100.0, 1000.0, 4_000_000),
                                               row("parent bf16", 100.1, 900.0, 2_000_000),
                                               row("bnb nf4", 104.0, 700.0, 1_500_000, 25_000.0)])
    figures = card.figures
    assert figures["perplexity"] == 1.04 and figures["quality"] == 0.9615 and figures["top10"] is None
    assert figures["speedup"] == 0.7 and figures["memory"] == 0.375 and figures["prefill"] == 1.25
    table = card.table()
    assert "decode, batch 32" in table and "700 tokens/s" in table and "| 104.00 | 0.9615 |" in table
    assert "| 25000 tokens/s (24500–25500; 1.25x) | 104.00 |" in table
    assert all(line.count("|") == 12 for line in table.splitlines()), table  # 11 columns in every line
    assert Card.from_dict(card.to_dict()).rows[-1].prefill_range == (24500.0, 25500.0)
    assert Gate.parse("prefill > 1.2").check(figures)[0]
    assert Gate.parse("perplexity <= 1.05 and memory < 0.5").check(figures)[0]
    assert not Gate.parse("perplexity <= 1.03").check(figures)[0]
    assert not Gate.parse(None).check(figures)[0]  # the default asks for quality >= 0.98: 4% worse fails
