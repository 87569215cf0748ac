"""A real headless browser for the tests that render HTML (the screen report).

Playwright drives Debian's ``chromium`` (its own browser download needs the network, and
the tests must run offline). When no chromium is found and we are root with apt-get, the
session installs it once. When it still cannot be found the browser tests fail under CI
(env var ``CI`` set) and are skipped elsewhere, with the command that fixes it.
Set ``BIOGEN_CHROMIUM`` to use another Chromium-family executable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests_support import apt_install, unavailable

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
INSTALL_COMMAND = "apt-get update -qq && apt-get install -y -qq chromium"
INSTALL_TIMEOUT_S = 600


def find_chromium() -> str | None:
    """The Chromium executable to drive: ``$BIOGEN_CHROMIUM`` or the first one on PATH."""
    override = os.environ.get("BIOGEN_CHROMIUM")
    if override:
        return override if Path(override).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium() -> str:
    """Install Debian's chromium with apt-get (root only); returns what happened, in words."""
    return apt_install("chromium", INSTALL_TIMEOUT_S)


def _unavailable(reason: str) -> None:
    unavailable(f"headless browser tests need Debian's chromium: {reason}. Install it with "
                f"`{INSTALL_COMMAND}` (as root) or set BIOGEN_CHROMIUM to a Chromium executable; "
                "the Python package is installed by `pip install -e '.[test]'` (playwright).")


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    override = os.environ.get("BIOGEN_CHROMIUM")
    if override and not Path(override).is_file():
        _unavailable(f"BIOGEN_CHROMIUM={override} is not a file")
    path = find_chromium()
    if path is None:
        outcome = install_chromium()
        path = find_chromium()
        if path is None:
            _unavailable(f"no {' / '.join(CHROMIUM_NAMES)} on PATH ({outcome})")
    return path


@pytest.fixture(scope="session")
def browser(chromium_executable):
    """One headless Chromium (playwright, sync API) for the whole session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"the playwright package is missing ({exc})")
    with sync_playwright() as pw:
        try:
            instance = pw.chromium.launch(executable_path=chromium_executable, headless=True)
        except Exception as exc:  # noqa: BLE001 - say which executable failed and why
            _unavailable(f"{chromium_executable} did not start under playwright: {exc}")
        yield instance
        instance.close()


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM on this machine for the whole session (tests/slurm_support.py):
    ``.conf``, ``.env`` (SLURM_CONF set), ``.partition``, ``.sbatch(args, cwd) -> job id``,
    ``.wait(job_id, timeout) -> (state, exit_code)``, ``.output(job_id)``. Installs Debian's
    slurm-wlm and munge when missing (root); fails under CI / skips elsewhere when it cannot."""
    from slurm_support import start_slurm

    with start_slurm() as cluster:
        yield cluster
