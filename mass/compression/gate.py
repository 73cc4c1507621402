"""The gate that decides whether a compressed child is registered: a small boolean expression over the card's
figures (``quality>=0.98 and speedup>=1.5``), parsed before any work starts and evaluated without ``eval``."""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any

from mass.errors import ConfigError

#: the card figures a gate may name, with what they mean
FIGURES = {
    "quality": "the child's quality relative to its parent (encoders: mean cosine to the parent's embeddings; causal "
               "LMs: the parent's perplexity / the child's, so 0.98 is about 2% worse)",
    "top10": "encoders: mean overlap of the top-10 retrieved documents with the parent's (0-1)",
    "perplexity": "causal LMs: child perplexity on the corpus's test split / parent's (1.05 is 5% worse)",
    "speedup": "child throughput at batch 32 / parent's (fp32)",
    "prefill": "causal LMs: child tokens/s of a forward over the test split's blocks (prompt processing, batches of "
               "8 x 128 tokens) / parent's",
    "latency": "child latency at batch 1 / parent's (below 1 is faster)",
    "memory": "child weights in memory / parent's (ONNX Runtime: the size of the graph's weights)",
    "rss": "child resident memory grown by loading and a warm-up pass / parent's (runtime buffers included)",
    "size": "child bytes on disk / parent's",
}
DEFAULT_GATE = "quality >= 0.98 and (speedup > 1.05 or memory < 0.9)"
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}


@dataclass(frozen=True)
class Gate:
    """A parsed gate expression; ``check(figures)`` says whether a child passes and why not."""

    text: str
    tree: ast.Expression

    @classmethod
    def parse(cls, text: str | None) -> "Gate":
        """Parse ``text`` (default ``DEFAULT_GATE``): comparisons of the figures in ``FIGURES`` with numbers,
        joined by ``and``/``or`` and parentheses. ConfigError naming what is wrong otherwise."""
        from mass.pyast import parse_python  # thread-safe ast.parse (see there)

        text = (text or DEFAULT_GATE).strip()
        try:
            tree = parse_python(text, mode="eval")
        except SyntaxError as exc:
            raise ConfigError(f"gate {text!r} does not parse: {exc.msg}; write e.g. {DEFAULT_GATE!r}",
                              field="gate") from None
        cls._check(tree.body, text)
        return cls(text, tree)

    @staticmethod
    def _check(node: ast.AST, text: str) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                Gate._check(value, text)
            return
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            for side in (node.left, *node.comparators):
                if isinstance(side, ast.Name):
                    if side.id not in FIGURES:
                        raise ConfigError(f"gate {text!r} names {side.id!r}; figures: {', '.join(FIGURES)}",
                                          field="gate")
                elif not (isinstance(side, ast.Constant) and isinstance(side.value, (int, float))
                          and not isinstance(side.value, bool)):
                    raise ConfigError(f"gate {text!r}: compare figures with numbers only, not "
                                      f"{ast.unparse(side)!r}", field="gate")
            return
        raise ConfigError(f"gate {text!r}: only comparisons (<, <=, >, >=) joined by and/or are allowed, not "
                          f"{ast.unparse(node)!r}", field="gate")

    def check(self, figures: dict[str, Any]) -> tuple[bool, str]:
        """(passed, the expression with the figures filled in); a figure the card lacks fails its comparison."""
        def value(node: ast.AST) -> Any:
            if isinstance(node, ast.BoolOp):
                results = [value(v) for v in node.values]
                return all(results) if isinstance(node.op, ast.And) else any(results)
            if isinstance(node, ast.Compare):
                sides = [_operand(s, figures) for s in (node.left, *node.comparators)]
                if any(s is None for s in sides):
                    return False
                return all(_COMPARE[type(op)](a, b) for op, a, b in zip(node.ops, sides, sides[1:]))
            raise AssertionError(node)  # (parse admits nothing else)

        shown = ", ".join(f"{n}={figures.get(n)!r}" for n in FIGURES if n in _names(self.tree))
        return bool(value(self.tree.body)), f"{self.text} with {shown}"


def _operand(node: ast.AST, figures: dict[str, Any]) -> float | None:
    if isinstance(node, ast.Name):
        found = figures.get(node.id)
        return None if found is None else float(found)
    return float(node.value)


def _names(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
