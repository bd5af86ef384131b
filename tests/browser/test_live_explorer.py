"""A real browser drives a lesson's live explorer in JupyterLab.

Run with ``make test-browser``: it starts JupyterLab on 127.0.0.1 with a
token, opens the lesson in headless Chromium (Debian's package, driven by
Playwright without any browser download), runs all cells, moves a slider and
checks that the plotly figure redrew. Screenshots land in
``tests/browser/screenshots/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = os.environ.get("BPSIM_BROWSER_NOTEBOOK", "06-locking-timelines.ipynb")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parent / "screenshots"

pytestmark = pytest.mark.skipif(
    not os.environ.get("BPSIM_BROWSER") or not Path(CHROMIUM).exists(),
    reason="browser test: run `make test-browser` (needs Debian's chromium and BPSIM_BROWSER=1)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on loopback serving a scratch copy of the notebooks."""
    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, BPSIM_FAST="1", JUPYTER_CONFIG_DIR=str(tmp_path / "jcfg"))
    env.pop("BPSIM_STATIC", None)
    (tmp_path / "jcfg" / "labconfig").mkdir(parents=True)
    # no "Jupyter news" pop-up over the page
    (tmp_path / "jcfg" / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
           "--ServerApp.open_browser=False"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 60 s")
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _plot_state(page) -> str:
    """The drawn traces of the last plotly figure (SVG paths and points)."""
    return page.evaluate(
        """() => { const plots = document.querySelectorAll('.js-plotly-plot');
                   const p = plots[plots.length - 1]; if (!p) return '';
                   return Array.from(p.querySelectorAll('.scatterlayer path, .barlayer path, .point'))
                               .map(e => e.getAttribute('d') || '').join('|'); }""")


def test_slider_redraws_figure(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-Toolbar-kernelStatus",
                                   timeout=90_000)
            page.click("text=Run", timeout=30_000)
            page.click("text=Run All Cells", timeout=30_000)
            slider = page.wait_for_selector(".widget-slider", timeout=300_000)
            page.wait_for_function(
                "() => document.querySelectorAll('.widget-slider').length > 0 && "
                "document.querySelectorAll('.jp-OutputArea .js-plotly-plot').length > 0", timeout=300_000)
            slider.scroll_into_view_if_needed()
            time.sleep(2)
            readout = page.locator(".widget-readout").first
            before_value, before_plot = readout.inner_text(), _plot_state(page)
            page.screenshot(path=str(SHOTS / "before.png"))
            handle = page.locator(".widget-slider .noUi-handle").first
            box = handle.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.down()
            page.mouse.move(box["x"] + 250, box["y"] + box["height"] / 2, steps=12)
            page.mouse.up()
            page.wait_for_function("v => document.querySelector('.widget-readout').innerText !== v",
                                   arg=before_value, timeout=30_000)
            after_value = readout.inner_text()
            page.wait_for_function(
                """before => { const plots = document.querySelectorAll('.js-plotly-plot');
                      const p = plots[plots.length - 1];
                      const now = Array.from(p.querySelectorAll('.scatterlayer path, .barlayer path, .point'))
                                      .map(e => e.getAttribute('d') || '').join('|');
                      return now !== before; }""", arg=before_plot, timeout=120_000)
            page.screenshot(path=str(SHOTS / "after.png"))
            assert after_value != before_value
            assert _plot_state(page) != before_plot
        finally:
            browser.close()
