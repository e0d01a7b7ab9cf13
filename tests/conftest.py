"""Shared test configuration. Each area's fixtures live in its own conftest (tests/<area>/conftest.py)."""

from __future__ import annotations

import os

# Tests never reach a hub or a GPU; keep them deterministic on a CPU-only machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
