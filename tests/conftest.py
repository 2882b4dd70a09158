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


@pytest.fixture
def chromium(tmp_path):
    """A factory of headless Chromium sessions (selenium), quit after the test: `chromium(*extra_flags)`.
    Chromium and chromedriver come from the system (apt-get install chromium chromium-driver); without them
    the test skips, and under CI=true it fails."""
    import shutil

    browser, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver_path):
        msg = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    webdriver = pytest.importorskip("selenium.webdriver")
    drivers = []

    def start(*extra_flags: str):
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                     "--window-size=1000,700", *extra_flags):
            opts.add_argument(flag)
        drivers.append(webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path)))
        return drivers[-1]

    yield start
    for d in drivers:
        try:
            d.quit()
        except Exception:  # already quit by the test
            pass
