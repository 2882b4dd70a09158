"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data directory kept beside the repo (../shared/data). Skipped locally when absent;
    under CI=true its absence is a failure, so CI can never pass by silently skipping real-data tests."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        msg = f"real-data directory {path} not found (it lives beside the repo, see shared/data/README.md)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
