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


@pytest.fixture(scope="session", autouse=True)
def _isolated_gptlab_cache(tmp_path_factory):
    """Measured matmul speeds (dtype auto, MFU's peak) go to a cache of this test session, subprocesses
    included, never to the user's ~/.cache/gptlab."""
    old = os.environ.get("GPTLAB_CACHE")
    os.environ["GPTLAB_CACHE"] = str(tmp_path_factory.mktemp("gptlab-cache"))
    yield
    if old is None:
        os.environ.pop("GPTLAB_CACHE", None)
    else:
        os.environ["GPTLAB_CACHE"] = old
