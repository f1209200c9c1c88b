"""The demonstration's reports, per kernel, for the terminal summary."""
from __future__ import annotations

REPORTS: dict[str, str] = {}
