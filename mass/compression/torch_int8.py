"""PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic``, deprecated since torch 2.13 but working): the one
place that calls it, so its removal is one place to change. A quantized model is stored as its HF config, the
quantized state dict (``torch.load(weights_only=True)`` reads it) and its tokenizer, and reloads without its source."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from mass.errors import ConfigError
from mass.models import TORCH_INT8_STATE as STATE_FILE  # the quantized state dict (int8 weights, scales, zero points)
from mass.models import QUANTIZATION_FILE as SPEC_FILE  # how to rebuild the modules the state dict fills
# the embedding tables a quantized copy may hold (word embeddings dominate small encoders; the position and token
# type tables are tiny and are indexed through expanded, non-contiguous ids that the quantized op refuses)
EMBEDDINGS = ("embeddings.word_embeddings",)


# the layers left in float by default: each block's FFN output projection, whose input (the GELU's output) has the
# outliers that per-tensor activation scales lose most on (MiniLM, held-out texts: mean cosine 0.974 with every
# Linear in int8, 0.987 with these six in float, at about a sixth less speed-up)
FLOAT_LAYERS = r"^encoder\.layer\.\d+\.output\.dense$"


def _spec(model, embeddings: bool, float_layers: str) -> dict:
    """``quantize_dynamic``'s qconfig spec by module name: every Linear whose name does not match ``float_layers``
    to int8 weights with a scale per output channel (activations get a per-tensor scale computed per call), and
    (``embeddings``) the word embedding table to int8 rows with a float scale each."""
    import re

    import torch
    from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig

    keep = re.compile(float_layers) if float_layers else None
    spec: dict = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and not (keep and keep.search(name))}
    if embeddings:
        spec.update({name: float_qparams_weight_only_qconfig for name in EMBEDDINGS})
    return spec


def check_float_layers(float_layers: str) -> None:
    """Refuse a ``float_layers`` pattern that is not a regular expression (before any work)."""
    import re

    try:
        re.compile(float_layers)
    except re.error as exc:
        raise ConfigError(f"--float-layers {float_layers!r} is not a regular expression: {exc}",
                          field="float_layers") from exc


def _quantize(model, embeddings: bool, float_layers: str = FLOAT_LAYERS):
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # the deprecation notice, once per call: stated in this module's docstring
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, _spec(model, embeddings, float_layers), dtype=torch.qint8, inplace=True)


def supported() -> str | None:
    """None when this CPU runs PyTorch's quantized kernels, else why not (a method that cannot run here is refused
    before any work)."""
    import torch

    engines = set(torch.backends.quantized.supported_engines)
    if not engines & {"x86", "fbgemm", "onednn", "qnnpack"}:
        return f"this torch build has no quantized CPU engine (supported_engines: {sorted(engines)})"
    return None


def quantize_dir(model_dir: Path, tokenizer_dir: Path, out: Path, embeddings: bool = True,
                 float_layers: str = FLOAT_LAYERS) -> Path:
    """Quantize the HF encoder in ``model_dir`` to dynamic int8 (Linear layers whose name matches the regular
    expression ``float_layers`` stay float; "" quantizes them all) and write it to ``out`` (``config.json``,
    ``STATE_FILE``, ``SPEC_FILE``, ``tokenizer/``); returns ``out``."""
    import re
    import shutil

    import torch

    from mass.models import TOKENIZER_DIR, load_hf_dir

    try:
        re.compile(float_layers)
    except re.error as exc:
        raise ConfigError(f"--float-layers {float_layers!r} is not a regular expression: {exc}",
                          field="float_layers") from exc
    model, tokenizer = load_hf_dir(model_dir, "embedding", tokenizer_dir=tokenizer_dir, dtype="float32")
    quantized = _quantize(model, embeddings, float_layers)
    out.mkdir(parents=True)
    try:
        model.config.save_pretrained(out)
        torch.save(quantized.state_dict(), out / STATE_FILE)
        (out / SPEC_FILE).write_text(json.dumps({"method": "torch-int8", "embeddings": embeddings,
                                                "float_layers": float_layers}))
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def load_dir(directory: Path):
    """The quantized encoder ``quantize_dir`` wrote: built from its config, quantized the same way, then filled
    with the stored int8 state (no float weights are read from disk)."""
    import torch
    from transformers import AutoConfig, AutoModel

    spec = json.loads((directory / SPEC_FILE).read_text())
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # a float skeleton (not on the meta device: its non-persistent buffers, e.g. position ids, are not in the state
    # dict), quantized in place, so the float weights are freed as each module is swapped
    from mass.models import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK:
        model = AutoModel.from_config(config).eval()
    model = _quantize(model, spec["embeddings"], spec["float_layers"])
    model.load_state_dict(torch.load(directory / STATE_FILE, weights_only=True))
    return model.eval()
