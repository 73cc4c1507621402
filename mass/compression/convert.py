"""``mass compress convert`` / ``jobs/convert.py``: a registered encoder exported to ONNX (and optionally quantized
to int8 by ONNX Runtime), checked for parity, measured against its parent, gated and registered — one method of
the compression job (``mass.compression.job``)."""

from __future__ import annotations

from mass.compression.job import METHODS as ALL_METHODS
from mass.compression.job import CompressionResult, result_text, run_compression  # noqa: F401  (the CLI's imports)

METHODS = {k: ALL_METHODS[k].help for k in ("onnx", "onnx-int8")}


def run_convert(ref: str, method: str = "onnx-int8", name: str | None = None, gate: str | None = None,
                tolerance: float = 1e-4, per_channel: bool = True, embeddings: bool = True,
                aliases: tuple[str, ...] = (), threads: int | None = None, rounds: int = 3,
                address: str | None = None, phases=None) -> CompressionResult:
    """Convert the registered encoder ``ref`` by ``method`` (``METHODS``) and register the child as a new version
    of ``name`` (default: ``<parent>-<method>``) if it passes ``gate``. An export beyond ``tolerance`` of its
    parent raises ``ParityError`` and registers nothing; see ``run_compression`` for the rest (``phases``
    included: jobs sharing one measure their common parent once)."""
    from mass.errors import ConfigError

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; conversion methods: {', '.join(METHODS)} (quantization: "
                          "mass compress quantize)", field="method")
    return run_compression(ref, [method], name=name, gate=gate, tolerance=tolerance, per_channel=per_channel,
                           embeddings=embeddings, aliases=aliases, threads=threads, rounds=rounds,
                           address=address, phases=phases)[0]


def add_common_args(parser, embeddings: bool = True) -> None:
    """The options every compression command shares (gate, name, measurements; ``embeddings``: the int8 option
    to keep the embedding tables in float)."""
    from mass.compression.gate import DEFAULT_GATE, FIGURES

    parser.add_argument("ref", help="the registered encoder to compress: name, name/3 or name@alias")
    parser.add_argument("--name", default=None, help="register the child under this model (default: "
                                                     "<parent>-<method>, e.g. minilm-l6-onnx-int8)")
    parser.add_argument("--gate", default=None, help=f"registration condition over {', '.join(FIGURES)} "
                                                     f"(default: {DEFAULT_GATE!r})")
    if embeddings:
        parser.add_argument("--keep-embeddings", action="store_true",
                            help="int8: leave the embedding tables in float")
    parser.add_argument("--alias", action="append", default=[], help="point these aliases at the child "
                                                                     "(one method only)")
    parser.add_argument("--threads", type=int, default=None, help="threads each measurement runs with "
                                                                  "(default: the node's CPUs)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per model (median and range)")


def add_convert_args(parser) -> None:
    """The options of ``mass compress convert`` and ``jobs/convert.py`` (one definition for both)."""
    add_common_args(parser)
    parser.add_argument("--method", default="onnx-int8", choices=list(METHODS),
                        help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference allowed between the export's embeddings and the parent's")
    parser.add_argument("--per-tensor", action="store_true", help="int8: one scale per weight tensor, not per "
                                                                  "output channel")


def convert_from_args(args, address: str | None = None) -> CompressionResult:
    """Run ``run_convert`` with parsed ``add_convert_args`` options."""
    return run_convert(args.ref, method=args.method, name=args.name, gate=args.gate, tolerance=args.tolerance,
                       per_channel=not args.per_tensor, embeddings=not args.keep_embeddings,
                       aliases=tuple(args.alias), threads=args.threads, rounds=args.rounds, address=address)
