"""``dtype: auto``: bf16 where it measured faster and passes a parity check at load, else as saved; the
deployment's ``describe()`` says which and why."""

from __future__ import annotations

import pytest
import torch

from mass.hardware import native_bf16
from mass.serving import precision
from mass.serving.precision import choose, weight_dtype


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from mass.registry.imports import minilm_dir

    return AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


def test_auto_serves_an_encoder_in_bf16_where_the_cpu_computes_it_natively(minilm):
    model, tok = minilm
    served, chosen = choose(model, tok, "embedding", "cpu")
    assert weight_dtype(model) == "float32"  # the loaded model is left as it was
    if native_bf16("cpu"):
        assert chosen.dtype == "bfloat16" and weight_dtype(served) == "bfloat16" and served is not model
        assert "parity with fp32 (lowest probe cosine" in chosen.reason
    else:
        assert chosen.dtype == "float32" and served is model and "no native bf16" in chosen.reason


@pytest.mark.skipif(not native_bf16("cpu"), reason="bf16 is only tried on a CPU with native bf16")
def test_a_bf16_copy_that_fails_the_parity_check_is_not_served(minilm, monkeypatch, caplog):
    model, tok = minilm
    monkeypatch.setattr(precision, "MIN_COSINE", 1.5)  # a floor no cosine reaches
    served, chosen = choose(model, tok, "embedding", "cpu")
    assert served is model and chosen.dtype == "float32"
    assert "bf16 failed the parity check (lowest probe cosine" in chosen.reason and "needs >= 1.5" in chosen.reason
    assert "serving fp32" in caplog.text


def test_auto_keeps_a_causal_lm_in_fp32_on_a_cpu(lm):
    model, tok = lm
    served, chosen = choose(model, tok, "llm", "cpu")
    assert served is model and chosen.dtype == "float32"
    assert ("llm_engines" in chosen.reason) == native_bf16("cpu")


def test_a_model_saved_in_bf16_stays_as_saved(lm):
    model, tok = lm
    half = model.to(torch.bfloat16)
    try:
        served, chosen = choose(half, tok, "llm", "cpu")
        assert served is half and chosen == precision.Precision("bfloat16", "auto: kept as saved (not fp32)")
    finally:
        model.to(torch.float32)


def test_the_deployment_says_what_it_chose(minilm, lm):
    from mass.serving.args import model_args
    from mass.serving.deployments import Served

    auto = Served(model_args({"name": "e", "ref": "minilm/1", "engine": "embedding"}), loaded=(*minilm, "minilm/1"))
    facts = auto.describe()
    assert facts["dtype"] == ("bfloat16" if native_bf16("cpu") else "float32") and facts["dtype_reason"]
    assert weight_dtype(auto.engine.model) == facts["dtype"]
    vectors = torch.tensor(auto.engine.embed(["a cat sits on the mat", "quarterly tax filing", "a"])[0])
    assert vectors.shape == (3, 384)  # pooled and normalised in fp32 even from a bf16 model: unit length
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)

    fixed = Served(model_args({"name": "g", "ref": "lm/1", "engine": "llm", "dtype": "float32",
                               "max_step_prompt_tokens": 64}), loaded=(*lm, "lm/1"))
    try:
        assert fixed.describe()["dtype"] == "float32" and fixed.describe()["dtype_reason"] == "as configured"
        assert fixed.engine.max_step_prompt_tokens == 64
    finally:
        fixed.engine.shutdown()
