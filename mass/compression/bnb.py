"""bitsandbytes int8 (LLM.int8) and nf4 copies of an HF model: memory, not speed (bitsandbytes promises none, and
the card says what it measured). The copy is an HF directory whose config carries its ``quantization_config``
(its tokenizer in ``tokenizer/``, its method in ``quantization.json``), so it reloads quantized without its source,
on CPU here and on GPUs where present. It is registered as its files: transformers cannot save a model it loaded
pre-quantized again (``revert_weight_conversion`` raises NotImplementedError)."""

from __future__ import annotations

from pathlib import Path

KINDS = ("int8", "nf4")


def supported() -> str | None:
    """None when bitsandbytes can quantize on this node, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        return f"bitsandbytes does not import here ({exc}); install mass-platform[serve]"
    return None


def quantize_dir(model_dir: Path, tokenizer_dir: Path, out: Path, kind: str, task: str = "embedding") -> Path:
    """Load the HF ``task`` model in ``model_dir`` through bitsandbytes (``kind``: int8 or nf4, linear layers only;
    the embedding tables, and a causal LM's output head, stay float) and save it with its tokenizer to ``out``;
    returns ``out``."""
    import json
    import shutil

    from mass.models import QUANTIZATION_FILE, TOKENIZER_DIR, load_hf_dir

    model, tokenizer = load_hf_dir(model_dir, task, tokenizer_dir=tokenizer_dir, quantization=kind, device="cpu")
    out.mkdir(parents=True)
    try:
        # saved before it ever runs: on its first CPU forward bitsandbytes repacks 4-bit weights for its kernel
        # (block scales transposed to bfloat16), and a model saved after that reloads with the wrong scales
        model.save_pretrained(out)
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
        (out / QUANTIZATION_FILE).write_text(json.dumps({"method": f"bnb-{kind}"}))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
