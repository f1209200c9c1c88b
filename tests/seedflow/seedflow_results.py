"""One line per kernel and program, printed side by side in the terminal summary."""
from __future__ import annotations

RESULTS: dict[str, dict[str, str]] = {}     # kernel -> program -> one-line result


def record(kernel: str, program: str, line: str) -> None:
    RESULTS.setdefault(kernel, {})[program] = line
