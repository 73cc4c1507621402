"""``mass compress quantize`` / ``jobs/quantize.py``: a registered encoder or causal LM quantized by several methods
at once (each a Ray task, in parallel), every child measured against the parent on its own card, gated and
registered."""

from __future__ import annotations

from mass.compression.job import METHODS, CompressionResult, run_compression

from mass.compression.job import DEFAULT_METHODS


def add_quantize_args(parser) -> None:
    """The options of ``mass compress quantize`` and ``jobs/quantize.py`` (one definition for both)."""
    from mass.compression.convert import add_common_args

    add_common_args(parser)
    parser.add_argument("--methods", default=None,
                        help="comma-separated, made in parallel (default: "
                             + "; ".join(f"{t} models: {','.join(m)}" for t, m in DEFAULT_METHODS.items()) + "); "
                             + "; ".join(f"{k}: {m.help}" for k, m in METHODS.items()))
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="onnx methods: largest difference allowed between the export's embeddings and the "
                             "parent's")
    parser.add_argument("--per-tensor", action="store_true", help="onnx-int8: one scale per weight tensor")
    parser.add_argument("--float-layers", default=None, metavar="REGEX",
                        help="torch-int8: Linear layers whose name matches stay float (default: each block's FFN "
                             "output projection, the layers int8 hurts most; '' quantizes every one)")


def quantize_from_args(args, address: str | None = None) -> list[CompressionResult]:
    """Run ``run_compression`` with parsed ``add_quantize_args`` options."""
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    return run_compression(args.ref, methods, name=args.name, gate=args.gate, tolerance=args.tolerance,
                           per_channel=not args.per_tensor, embeddings=not args.keep_embeddings,
                           float_layers=args.float_layers, aliases=tuple(args.alias), threads=args.threads,
                           rounds=args.rounds, address=address)
