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


#: the first explorer: the widget box holding both a slider and a plotly figure
EXPLORER = ".widget-vbox:has(.widget-slider):has(.js-plotly-plot)"

#: JavaScript: the drawn traces (SVG paths and points) of the first explorer's figure
_PLOT_JS = f"""() => {{ const box = document.querySelector({EXPLORER!r});
    const p = box && box.querySelector('.js-plotly-plot'); if (!p) return '';
    return Array.from(p.querySelectorAll('.scatterlayer path, .barlayer path, .point'))
                .map(e => e.getAttribute('d') || '').join('|'); }}"""


def _plot_state(page) -> str:
    return page.evaluate(_PLOT_JS)


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
            # JupyterLab may ask which kernel to start (several are installed): take the default
            dialog = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
            try:
                dialog.wait_for(timeout=10_000)
                dialog.click()
            except Exception:  # no dialog: the notebook's kernel started by itself
                pass
            page.click(".lm-MenuBar-itemLabel:text-is('Run')", timeout=30_000)
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')", timeout=30_000)
            box = page.wait_for_selector(EXPLORER, timeout=int(os.environ.get("BPSIM_BROWSER_TIMEOUT", "300")) * 1000)
            box.scroll_into_view_if_needed()
            page.wait_for_function(f"() => ({_PLOT_JS})() !== ''", timeout=120_000)  # the figure has drawn
            readout = page.locator(f"{EXPLORER} .widget-readout").first
            before_value, before_plot = readout.inner_text(), _plot_state(page)
            assert before_plot, "the explorer's figure drew no traces"
            page.screenshot(path=str(SHOTS / "before.png"))
            handle = page.locator(f"{EXPLORER} .widget-slider .noUi-handle").first
            hb = handle.bounding_box()
            page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
            page.mouse.down()
            page.mouse.move(hb["x"] + 250, hb["y"] + hb["height"] / 2, steps=12)
            page.mouse.up()
            readout.page.wait_for_function(
                f"v => document.querySelector({EXPLORER!r} + ' .widget-readout').innerText !== v",
                arg=before_value, timeout=30_000)
            after_value = readout.inner_text()
            page.wait_for_function(f"before => ({_PLOT_JS})() !== before", arg=before_plot, timeout=120_000)
            page.screenshot(path=str(SHOTS / "after.png"))
            assert after_value != before_value
            assert _plot_state(page) != before_plot
        except BaseException:
            page.screenshot(path=str(SHOTS / "failure.png"))
            (SHOTS / "failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
