"""Fixtures for the conformance + abuse suite (helpers live in probe.py)."""
import pytest

from tests.conformance.probe import recording_upstream


@pytest.fixture
async def upstream():
    async with recording_upstream() as rec:
        yield rec
