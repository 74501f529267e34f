"""Browser test harness: start launch.py on a free port as a user would, drive it with Playwright in Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect

# CI runs on two shared cores: a Gradio round trip can take longer than Playwright's 5 s default for assertions.
expect.set_options(timeout=30_000)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_idle(page) -> None:
    """Every event the page has started has answered: Gradio marks the outputs of a pending event `.pending`.
    Typing into a form while an earlier event is still on its way races that event's outputs."""
    expect(page.locator(".pending")).to_have_count(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_studio(home: Path, *args: str, timeout: float = 120.0):
    """Run `python launch.py` with WAN_STUDIO_HOME=home; yield its URL once it answers; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "WAN_STUDIO_HOME": str(home), "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(home / f"studio-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), *args], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"studio exited with {proc.returncode}:\n{(home / log.name).read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError as err:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"studio did not answer on {url}") from err
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium not found: `make browser` installs Debian's chromium package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def demo_studio(demo_home):
    """One studio on the demo project, shared by the browser tests of a session."""
    with running_studio(demo_home) as url:
        yield url


@pytest.fixture(scope="module")
def studio(demo_home, tmp_path_factory):
    """A studio of this test module's own on a fresh copy of the demo project (tests may change it freely)."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(demo_home, home, dirs_exist_ok=True)
    with running_studio(home) as url:
        yield url, home / "demo"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture
def stop_jobs_afterwards(studio):
    """Training jobs outlive the studio by design; a test must not leave one behind, even when it fails."""
    yield
    from engine.core.layout import jobs_dir
    from engine.jobs import JobRunner

    runner = JobRunner(jobs_dir(studio[1].parent))
    job = runner.current()
    if job is not None:
        runner.stop(job, grace_s=30)
