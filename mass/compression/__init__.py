"""Compression and conversion: children of a registered model (ONNX, int8...) measured against their parent
on the same machine in the same run (the card), and registered only when they pass a gate."""
