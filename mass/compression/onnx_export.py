"""Export an HF encoder to ONNX (torch's exporter), check the export against the source, and quantize the
exported graph to int8 with ONNX Runtime's dynamic quantization."""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

from mass.errors import ConfigError
from mass.models import ONNX_FILE, TOKENIZER_DIR

log = logging.getLogger(__name__)


def export_encoder(model_dir: Path, out_dir: Path, tokenizer_dir: Path | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (one file; inputs ``input_ids``, ``attention_mask``; output
    ``last_hidden_state``, batch and sequence dynamic) and ``out_dir/tokenizer/`` from the HF encoder in
    ``model_dir`` (its tokenizer there or in ``tokenizer_dir``). Returns ``out_dir``."""
    import torch

    from mass.models import load_hf_dir

    model, tokenizer = load_hf_dir(model_dir, "embedding", tokenizer_dir=tokenizer_dir, dtype="float32")

    class LastHidden(torch.nn.Module):  # one tensor out, no cache arguments: what the runtime feeds
        def __init__(self, encoder) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    sample = tokenizer(["an example sentence to trace", "another"], padding=True, return_tensors="pt")
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2)  # (1 is specialised)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes: not the user's to fix
            program = torch.onnx.export(LastHidden(model).eval(), (sample["input_ids"], sample["attention_mask"]),
                                        input_names=["input_ids", "attention_mask"],
                                        output_names=["last_hidden_state"],
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), dynamo=True,
                                        verbose=False)
            program.save(str(out_dir / ONNX_FILE), external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's errors are long; the first line names the op
        raise ConfigError(f"cannot export {model_dir} to ONNX: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", field="model") from exc
    tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
    model.config.to_json_file(str(out_dir / "config.json"))  # (what the fusions need: type, heads, width)
    return out_dir


def quantize_int8(src_dir: Path, out_dir: Path, per_channel: bool = True, embeddings: bool = True,
                  fuse: bool = True) -> Path:
    """ONNX Runtime dynamic int8 of ``src_dir/model.onnx`` into ``out_dir`` (with the tokenizer): int8 weights
    with scales per output channel (``per_channel``), activations quantized on the fly; ``embeddings`` also
    stores the embedding tables (``Gather``) as int8, which dominate a small encoder's size. ``fuse`` first
    applies ONNX Runtime's transformer fusions (bias + GELU, skip + LayerNorm) to BERT-type graphs: measured on
    MiniLM here, the int8 graph then ran about 2.1x torch fp32 instead of about 1.6x, at the same cosine."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    graph = onnx.load(str(src_dir / ONNX_FILE), load_external_data=False)
    if any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul") for n in graph.graph.node):
        raise ConfigError(f"{src_dir / ONNX_FILE} is already quantized (int8 ops in its graph); quantize its "
                          "float parent instead", field="method")
    out_dir.mkdir(parents=True, exist_ok=True)
    ops = ["MatMul", "Gemm", "Gather"] if embeddings else ["MatMul", "Gemm"]
    source = _fused(src_dir, out_dir / "fused.onnx") if fuse else src_dir / ONNX_FILE
    try:
        with _quiet("root"):  # (its advice to pre-process first: measured here, it changed nothing for encoders)
            quantize_dynamic(str(source), str(out_dir / ONNX_FILE), weight_type=QuantType.QInt8,
                             per_channel=per_channel, op_types_to_quantize=ops)
    finally:
        (out_dir / "fused.onnx").unlink(missing_ok=True)
    shutil.copytree(src_dir / TOKENIZER_DIR, out_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    return out_dir


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Raise ``loggers`` to ERROR while the block runs."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _fused(src_dir: Path, target: Path) -> Path:
    """``src_dir/model.onnx`` with ONNX Runtime's transformer fusions written to ``target`` (BERT-type encoders;
    anything else, or an export without its config, is returned unfused)."""
    import json

    config_file = src_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("model_type") not in ("bert", "roberta", "distilbert"):
        return src_dir / ONNX_FILE
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet("onnxruntime", "onnxruntime.transformers", "root"):
        fused = optimize_model(str(src_dir / ONNX_FILE), model_type="bert", num_heads=config["num_attention_heads"],
                               hidden_size=config["hidden_size"])
    fused.save_model_to_file(str(target))
    log.info("fused %s: %s", src_dir / ONNX_FILE, {k: v for k, v in fused.get_fused_operator_statistics().items()
                                                    if v})
    return target
