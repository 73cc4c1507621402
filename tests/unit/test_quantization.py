"""The quantized copies of the pretrained MiniLM, without Ray: PyTorch dynamic int8 reloads from its own files to
the same outputs, smaller; bitsandbytes copies reload quantized from their config; a method this machine cannot
run is refused by name before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mass.models import load_bnb_dir, load_hf_dir, load_torch_int8_dir, quantized_format, weights_bytes
from mass.registry.imports import minilm_dir

TEXTS = ["Return the number of items in a container.", "Open a file and return a stream.", "x"]


def _embed(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def parent():
    return load_hf_dir(Path(minilm_dir()), "embedding", dtype="float32")


@pytest.mark.parametrize("embeddings", [True, False])
def test_torch_int8_reloads_from_its_own_files_to_the_same_outputs_and_is_smaller(parent, tmp_path, embeddings):
    from mass.compression.torch_int8 import FLOAT_LAYERS, _quantize, quantize_dir

    out = quantize_dir(Path(minilm_dir()), Path(minilm_dir()), tmp_path / "child", embeddings=embeddings)
    spec = json.loads((out / "quantization.json").read_text())
    assert spec == {"method": "torch-int8", "embeddings": embeddings, "float_layers": FLOAT_LAYERS}
    assert quantized_format(out) == "torch-int8"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "quantization.json", "quantized.pt", "tokenizer"]
    assert not list(out.glob("*.safetensors"))  # no float weights travel with it
    child, tokenizer = load_torch_int8_dir(out, out / "tokenizer", "minilm-int8/1")
    layer = child.encoder.layer[0].attention.self.query
    assert type(layer).__module__.startswith("torch.ao.nn.quantized.dynamic"), type(layer)
    assert type(child.encoder.layer[0].output.dense) is torch.nn.Linear  # the default float layers stay float
    assert type(child.embeddings.word_embeddings).__module__.startswith("torch.ao.nn.quantized") == embeddings
    fresh = _quantize(load_hf_dir(Path(minilm_dir()), "embedding", dtype="float32")[0], embeddings, FLOAT_LAYERS)
    assert torch.equal(_embed(child, tokenizer), _embed(fresh, tokenizer))  # the reload is the quantized model
    cosine = (_embed(child, tokenizer) * _embed(*parent)).sum(1)
    assert cosine.min() > 0.95, cosine
    ratio = weights_bytes(child) / weights_bytes(parent[0])
    assert ratio < (0.45 if embeddings else 0.8), ratio  # int8 Linear weights (and word embeddings)


def test_a_torch_int8_copy_refuses_load_options_it_cannot_honour(tmp_path):
    from mass.compression.torch_int8 import quantize_dir
    from mass.errors import ConfigError

    out = quantize_dir(Path(minilm_dir()), Path(minilm_dir()), tmp_path / "child")
    with pytest.raises(ConfigError, match="PyTorch dynamic-int8 model: its precision was fixed"):
        load_torch_int8_dir(out, out / "tokenizer", "m/1", dtype="bfloat16")
    with pytest.raises(ConfigError, match="serve it without GPUs"):
        load_torch_int8_dir(out, out / "tokenizer", "m/1", device="cuda")


def test_a_bitsandbytes_copy_reloads_quantized_from_its_config(parent, tmp_path):
    from mass.compression.bnb import quantize_dir
    from mass.errors import ConfigError

    out = quantize_dir(Path(minilm_dir()), Path(minilm_dir()), tmp_path / "nf4", "nf4")
    assert quantized_format(out) == "bnb"
    child, tokenizer = load_bnb_dir(out, out / "tokenizer", "m/1")  # no quantization asked for: the config has it
    assert type(child.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"
    assert weights_bytes(child) < 0.7 * weights_bytes(parent[0])  # the embedding tables stay float
    assert (_embed(child, tokenizer) * _embed(*parent)).sum(1).min() > 0.9
    with pytest.raises(ConfigError, match="bitsandbytes model: its precision was fixed"):
        load_bnb_dir(out, out / "tokenizer", "m/1", quantization="int8")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_bitsandbytes_gpt2_reloads_to_the_model_it_quantized(tmp_path, kind):
    """A causal LM's copy (GPT-2: Conv1D layers) reloads to what the model quantized in memory computes (a 4-bit
    model saved after a CPU forward would not: bitsandbytes repacks its weights for its kernel then)."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from mass.compression.bnb import quantize_dir

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "gpt")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                            eos_token="[UNK]").save_pretrained(tmp_path / "gpt")
    out = quantize_dir(tmp_path / "gpt", tmp_path / "gpt", tmp_path / kind, kind, task="text-generation")
    held, _ = load_hf_dir(tmp_path / "gpt", "text-generation", quantization=kind, device="cpu")
    child, _ = load_bnb_dir(out, out / "tokenizer", "m/1", task="text-generation")
    assert type(child.transformer.h[0].attn.c_attn).__name__ == ("Linear4bit" if kind == "nf4" else "Linear8bitLt")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(child(ids).logits, held(ids).logits)


def test_a_method_this_machine_cannot_run_is_refused_by_name_before_any_work(monkeypatch):
    """bitsandbytes made unimportable (as on a node without it): the job refuses before it resolves the parent."""
    from mass.compression.job import run_compression, unsupported
    from mass.errors import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert "bitsandbytes does not import here" in unsupported("bnb-nf4")
    assert unsupported("torch-int8") is None
    with pytest.raises(ConfigError, match="method 'bnb-nf4' cannot run on this machine: bitsandbytes"):
        run_compression("no-such-model", ["torch-int8", "bnb-nf4"])
    with pytest.raises(ConfigError, match="unknown method 'gptq'; methods: onnx, onnx-int8, torch-int8"):
        run_compression("no-such-model", ["gptq"])
    with pytest.raises(ConfigError, match="--alias needs a single method"):
        run_compression("no-such-model", ["torch-int8", "onnx-int8"], aliases=("fast",))
    with pytest.raises(ConfigError, match="no method given"):
        run_compression("no-such-model", [])
    with pytest.raises(ConfigError, match=r"--float-layers '\(' is not a regular expression"):
        run_compression("no-such-model", ["torch-int8"], float_layers="(")


def test_the_job_script_refuses_an_unknown_method_with_one_json_line_and_the_config_exit_code():
    import subprocess

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "jobs" / "quantize.py"), "minilm-l6", "--methods", "gptq"],
                          capture_output=True, text=True, timeout=120, cwd=root)
    from mass.errors import ConfigError

    assert proc.returncode == ConfigError.exit_code, proc.stderr
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error["code"] == ConfigError.code and "unknown method 'gptq'" in error["message"]
    assert "error: unknown method 'gptq'" in proc.stderr
