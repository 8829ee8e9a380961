"""Shared fixtures: the checked-in data subsets and the full shared data (when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
V2_SUBSET = FIXTURES / "twitter-gmner-v2"
V1_QUIRKS = FIXTURES / "twitter-gmner-v1-quirks"
#: The full Twitter-GMNER v2.0 annotations, in ../shared/data next to the repository.
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data" / "twitter-gmner-v2"


@pytest.fixture(scope="session")
def v2_subset() -> Path:
    """A small verbatim subset of Twitter-GMNER v2.0 (train and dev), see fixtures/README.md."""
    return V2_SUBSET


@pytest.fixture(scope="session")
def v1_quirks() -> Path:
    """A hand-made folder exercising the reader's quirks (BOM, CRLF, IOBES, ...)."""
    return V1_QUIRKS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full Twitter-GMNER v2.0 annotations; the test is skipped when they are absent."""
    if not (SHARED_DATA / "txt" / "train.txt").is_file():
        pytest.skip(f"full Twitter-GMNER data not found at {SHARED_DATA}")
    return SHARED_DATA
