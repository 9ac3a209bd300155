"""Shared test set-up: make `tests/guest` importable (the test guest builder)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "guest"))
