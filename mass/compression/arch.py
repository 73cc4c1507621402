"""Where a model family keeps what distillation and pruning change: its layer count and FFN width in the config, its
layers and FFN tensors in the state dict. Two families: BERT-style encoders and GPT-2-style causal LMs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arch:
    """One family's names. ``ffn_in``/``ffn_out`` are the state keys (under a layer's prefix) of the weights into and
    out of the FFN's hidden channels; ``in_axis``/``out_axis`` the axis of each that indexes those channels."""

    causal: bool
    layers_key: str  # config: the number of layers
    ffn_key: str  # config: the FFN's hidden width
    prefix: str  # state dict: layer i is under f"{prefix}.{i}."
    ffn_in: str
    ffn_in_bias: str
    ffn_out: str
    in_axis: int
    out_axis: int
    activation: str  # module path (under the layer) whose output is the FFN's hidden channels
    dropouts: tuple[str, ...] = ()  # config: the dropout probabilities (a student is trained with them at 0)

    def ffn_width(self, spec: dict[str, Any]) -> int:
        """The FFN's hidden width (GPT-2 leaves ``n_inner`` unset for 4 x its width)."""
        return spec.get(self.ffn_key) or 4 * spec["n_embd"]

    def layer_modules(self, model) -> list:
        """The model's layers, in order."""
        module = model
        for part in self.prefix.split("."):
            module = getattr(module, part)
        return list(module)


ENCODER = Arch(False, "num_hidden_layers", "intermediate_size", "encoder.layer", "intermediate.dense.weight",
               "intermediate.dense.bias", "output.dense.weight", 0, 1, "intermediate",
               ("hidden_dropout_prob", "attention_probs_dropout_prob"))
GPT2 = Arch(True, "n_layer", "n_inner", "transformer.h", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
            1, 0, "mlp.act", ("resid_pdrop", "embd_pdrop", "attn_pdrop"))  # Conv1D weights are stored (in, out)


def arch_of(spec: dict[str, Any]) -> Arch:
    """The family of the model whose config dict is ``spec``; ``ValueError`` naming it for any other."""
    if spec.get("model_type") == "gpt2":
        return GPT2
    if spec.get("model_type") in ("bert", "roberta", "xlm-roberta", "electra"):  # encoder.layer.N.intermediate...
        return ENCODER
    raise ValueError(f"distillation and pruning know BERT-style encoders and GPT-2 causal LMs, not "
                     f"{spec.get('model_type')!r} models")


def build(spec: dict[str, Any]):
    """A model of ``spec`` with random weights: an encoder (``AutoModel``) or a causal LM with its head."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from mass.models import MODEL_BUILD_LOCK

    auto = AutoModelForCausalLM if arch_of(spec).causal else AutoModel
    with MODEL_BUILD_LOCK:
        return auto.from_config(AutoConfig.for_model(**spec))
