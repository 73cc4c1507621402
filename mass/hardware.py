"""What this node's hardware computes natively, for choices that depend on it (training precision)."""

from __future__ import annotations


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` ("cpu" or "cuda") has native bfloat16 arithmetic: a CPU with AVX-512 BF16 (or AMX),
    a CUDA GPU that supports it (Ampere and later). Elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)
