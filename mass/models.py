"""Load a Hugging Face model directory (model + tokenizer) offline, with a dtype and optional bitsandbytes
quantization, an ONNX export (``model.onnx`` + its tokenizer) through ONNX Runtime, or a PyTorch dynamic-int8 copy:
what serving, training, compression and registration share."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from mass.errors import ConfigError

ONNX_FILE = "model.onnx"  # an ONNX export's graph, weights inside (one file: MiniLM-class models are far below 2 GB)
TOKENIZER_DIR = "tokenizer"  # beside it in an export directory
TORCH_INT8_STATE = "quantized.pt"  # a PyTorch dynamic-int8 copy's quantized state dict (mass.compression.torch_int8)
# transformers patches process-wide state while it builds a model (``PreTrainedModel.tie_weights`` and the weight
# initialisers are swapped for no-ops and restored after): two threads building at once can restore each other's
# no-op, and every later model of the process loses its tied weights (seen: GPT-2's lm_head "MISSING", random or on
# the meta device, after a compression pipeline's steps loaded models side by side). One build at a time per process.
MODEL_BUILD_LOCK = threading.RLock()
QUANTIZATION_FILE = "quantization.json"  # a quantized copy's method ({"method": "torch-int8" | "bnb-int8" | ...})


def quantized_format(directory: Path) -> str | None:
    """The registry format of a quantized copy in ``directory`` (``torch-int8`` or ``bnb``), None if it is not
    one."""
    spec = directory / QUANTIZATION_FILE
    if not spec.is_file():
        return None
    method = json.loads(spec.read_text()).get("method", "")
    return "bnb" if method.startswith("bnb-") else method


def weights_bytes(model) -> int:
    """Bytes of a model's weights and buffers as stored (what a version's ``size_bytes`` reports); tied
    tensors (GPT-2's input and output embeddings) count once, as safetensors stores them. Quantized tensors count
    their integer values (their scales are a few bytes per row); packed (weight, bias) pairs count both."""
    import torch

    seen: dict[tuple[int, int], int] = {}

    def add(value) -> None:
        if isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        elif isinstance(value, torch.Tensor):
            key = (id(value), 0) if value.is_quantized else (value.untyped_storage().data_ptr(), value.storage_offset())
            seen[key] = value.numel() * value.element_size()

    for value in model.state_dict().values():
        add(value)
    return sum(seen.values())


def load_hf_dir(model_dir: Path, task: str, tokenizer_dir: Path | None = None, dtype: str = "auto",
                quantization: str = "none", device: str | None = None):
    """Load model + tokenizer from an HF directory with the Auto class for ``task`` (offline only).

    ``dtype`` picks the weight dtype ("auto" keeps the saved one); ``quantization`` "int8"/"nf4" loads the
    linear layers through bitsandbytes (CPU or GPU); ``device`` moves (or, quantized, places) the model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer_dir = tokenizer_dir or model_dir
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ConfigError(f"no tokenizer in {tokenizer_dir}: save it beside the model with "
                          "tokenizer.save_pretrained(dir)", field="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load the tokenizer in {tokenizer_dir}: {str(exc).splitlines()[0]}",
                          field="tokenizer") from exc
    auto = AutoModelForCausalLM if task == "text-generation" else AutoModel
    kwargs = _load_kwargs(dtype, quantization, device, _prequantized(model_dir))
    try:
        with MODEL_BUILD_LOCK:
            model = auto.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except Exception as exc:
        raise ConfigError(f"cannot load a {task} model from {model_dir}: {str(exc).splitlines()[0]}",
                          field="model_dir") from exc
    if device and "device_map" not in kwargs:
        model.to(device)
    if getattr(model.config, "quantization_config", None) is not None:
        # LLM.int8 on CPU logs "inputs will be cast ... to float16" at WARNING on every matmul of every call
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    model.eval()
    return model, tokenizer


def _prequantized(model_dir: Path) -> bool:
    """Whether the HF directory holds a model saved quantized (its config carries a ``quantization_config``)."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _load_kwargs(dtype: str, quantization: str, device: str | None, prequantized: bool = False) -> dict:
    """``from_pretrained`` keyword arguments for a dtype and a bitsandbytes quantization (``prequantized``: the
    directory holds a model saved quantized, whose config says how)."""
    import torch

    kwargs: dict = {}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    if quantization == "none":
        if prequantized:  # without a device map transformers puts it on the GPU whenever one exists (seen on an H200)
            kwargs["device_map"] = {"": device or "cpu"}
        return kwargs
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; fail here with the fix)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError(f"quantization={quantization!r} needs bitsandbytes: pip install 'mass-platform[serve]'",
                          field="quantization") from exc
    if quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "nf4":
        compute = getattr(torch, dtype) if dtype != "auto" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=compute)
    else:
        raise ConfigError(f"unknown quantization {quantization!r}; use none, int8 or nf4", field="quantization")
    kwargs["device_map"] = {"": device or "cpu"}  # quantized models cannot be moved after loading
    return kwargs


def onnx_bytes(directory: Path) -> int:
    """Bytes on disk of an ONNX export's graph and weights (its ``.onnx`` and external-data files)."""
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and f.name.startswith("model.onnx"))


def _fixed_precision(ref: str, what: str, dtype: str, quantization: str, device: str | None,
                     cpu_only: bool = True) -> None:
    """Refuse load options that a precompiled artifact (``what``) cannot honour (and GPUs, when ``cpu_only``)."""
    if dtype not in ("auto", "float32") or quantization != "none":
        raise ConfigError(f"{ref} is {what}: its precision was fixed when it was made; leave dtype and "
                          f"quantization at their defaults (got dtype={dtype!r}, quantization={quantization!r})",
                          field="dtype" if dtype not in ("auto", "float32") else "quantization")
    if cpu_only and device not in (None, "cpu"):
        raise ConfigError(f"{ref} is {what}, which runs on the CPU; serve it without GPUs (got device {device!r})",
                          field="num_gpus")


def load_onnx_dir(directory: Path, tokenizer_dir: Path, ref: str, dtype: str = "auto", quantization: str = "none",
                  device: str | None = None, task: str = "embedding"):
    """(encoder, tokenizer) of an ONNX export: ``OnnxEncoder`` on ONNX Runtime's CPU provider (exports are of
    encoders: ``task`` is always embedding). The weights' precision is fixed by the export, so ``dtype`` and
    ``quantization`` must be left at their defaults."""
    from transformers import AutoTokenizer

    from mass.serving.engines.onnx_encoder import OnnxEncoder

    _fixed_precision(ref, "an ONNX export (served by ONNX Runtime)", dtype, quantization, device)
    return OnnxEncoder(directory), AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def load_bnb_dir(directory: Path, tokenizer_dir: Path, ref: str, dtype: str = "auto", quantization: str = "none",
                 device: str | None = None, task: str = "embedding"):
    """(model, tokenizer) of a bitsandbytes copy of a ``task`` model: an HF directory whose config carries its
    quantization (CPU, or the GPU ``device``); ``dtype`` and ``quantization`` must be left at their defaults."""
    _fixed_precision(ref, "a bitsandbytes model", dtype, quantization, device, cpu_only=False)
    return load_hf_dir(directory, task, tokenizer_dir=tokenizer_dir, device=device)


def load_torch_int8_dir(directory: Path, tokenizer_dir: Path, ref: str, dtype: str = "auto",
                        quantization: str = "none", device: str | None = None, task: str = "embedding"):
    """(encoder, tokenizer) of a PyTorch dynamic-int8 copy (``mass.compression.torch_int8``; of encoders: ``task``
    is always embedding): int8 weights run by PyTorch's quantized CPU kernels; ``dtype`` and ``quantization`` must
    be left at their defaults."""
    from transformers import AutoTokenizer

    from mass.compression.torch_int8 import load_dir

    _fixed_precision(ref, "a PyTorch dynamic-int8 model", dtype, quantization, device)
    return load_dir(directory), AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
