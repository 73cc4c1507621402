"""``OnnxEncoder``: an encoder exported to ONNX, run by ONNX Runtime behind the small part of the transformers
``AutoModel`` interface that ``EmbeddingEngine`` uses, so the engine (pooling, batching, order) is shared and
only the runtime differs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from mass.models import ONNX_FILE


@dataclass(frozen=True)
class _Config:
    hidden_size: int


class OnnxEncoder:
    """Run ``<directory>/model.onnx`` (inputs ``input_ids`` and ``attention_mask``, output
    ``last_hidden_state``) on the CPU with ``threads`` intra-op threads (default: torch's thread count)."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        # idle pool threads sleep instead of spinning: beside Ray's own threads and other replicas on a few cores,
        # spinning cost the int8 MiniLM about a fifth of its throughput in a Ray worker here (386-452 against
        # 477-593 texts/s, two runs each)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(directory) / ONNX_FILE
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        shape = self.session.get_outputs()[0].shape
        if not isinstance(shape[-1], int):
            raise ValueError(f"{self.path}: the output's last dimension (the hidden size) is not fixed: {shape}")
        self.config = _Config(hidden_size=shape[-1])
        self.device = torch.device("cpu")

    def eval(self) -> "OnnxEncoder":
        """No-op (an ONNX graph has no training mode); returns itself, as ``nn.Module.eval`` does."""
        return self

    def __call__(self, input_ids, attention_mask, **_ignored) -> SimpleNamespace:
        """``last_hidden_state`` (a float32 tensor) for a padded batch of torch tensors."""
        import torch

        feed = {"input_ids": input_ids.numpy().astype("int64"), "attention_mask": attention_mask.numpy().astype("int64")}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = feed["input_ids"] * 0
        hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))
