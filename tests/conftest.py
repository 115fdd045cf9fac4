"""Shared fixtures live in tests/<area>/conftest.py; this file only sets the project root."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
