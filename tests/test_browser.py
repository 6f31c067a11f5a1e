"""The seed story in real JupyterLab, driven in Debian's headless Chromium with Playwright.

Open the out-of-memory notebook, run all cells, see the dashboard (a rendered widget, not its
text fallback), the failed step and its root cause; click "Apply fix & rerun"; see the workflow
complete with the extract and validation reused. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from labserver import CHROMIUM, CHROMIUM_ARGS, JupyterLab, chromium_available

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = ROOT / "test-artifacts"


def _small_copy(src: Path, dest: Path, rows: int, max_memory: str) -> None:
    """The notebook up to its failing %%workflow cell (the rest would apply the fix in code)."""
    nb = json.loads(src.read_text())
    last = max(i for i, c in enumerate(nb["cells"]) if "%%workflow" in "".join(c["source"]))
    nb["cells"] = nb["cells"][:last + 1]
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell["source"] = f'rows = {rows}\nmax_memory = "{max_memory}"\ndata_dir = "data"\n'
    dest.write_text(json.dumps(nb))


@pytest.fixture
def lab(tmp_path):
    if not chromium_available():
        pytest.fail("Debian's chromium is missing: `apt-get install chromium` (./scripts/test does it)")
    _small_copy(ROOT / "notebooks" / "02-debugging-out-of-memory.ipynb", tmp_path / "seed.ipynb",
                rows=300_000, max_memory="256MB")
    server = JupyterLab(tmp_path, env={"PYTHONPATH": str(ROOT)}).start()
    yield server
    server.stop()


def _status_idle(page, timeout=120_000):
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-StatusBar-TextItem, .jp-StatusBar-Item')]"
        ".some(e => /\\|\\s*Idle/.test(e.textContent))", timeout=timeout)


def _screenshot(locator, path: Path, attempts: int = 5) -> None:
    """Screenshot ``locator``, again if its element was replaced meanwhile: when the run
    ends, the cell's display is updated (dashboard + static summary) and JupyterLab renders
    a new view of the same widget, detaching the element the locator had found."""
    from playwright.sync_api import Error

    page = locator.page
    viewport = page.viewport_size
    try:
        for attempt in range(attempts):
            try:
                # JupyterLab scrolls the notebook inside its own panel: make the window tall
                # enough for the whole dashboard, or the screenshot stitches in the page around it
                height = int(locator.evaluate("e => e.getBoundingClientRect().height", timeout=15_000))
                page.set_viewport_size({"width": viewport["width"],
                                        "height": max(viewport["height"], height + 400)})
                locator.scroll_into_view_if_needed(timeout=15_000)
                locator.screenshot(path=str(path), timeout=15_000)
                return
            except Error:
                if attempt == attempts - 1:
                    raise
                page.wait_for_timeout(1_000)
    finally:
        page.set_viewport_size(viewport)


@contextlib.contextmanager
def _notebook_running(lab: JupyterLab, notebook: str):
    """Open ``notebook`` in JupyterLab, wait for its kernel, Run All Cells; yields the page."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{lab.url}/lab/tree/{notebook}?token={lab.token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            _status_idle(page)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
            yield page
        finally:
            browser.close()


def test_seed_story_in_jupyterlab(lab):
    from playwright.sync_api import expect

    with _notebook_running(lab, "seed.ipynb") as page:
        dashboard = page.locator(".nbflow-dashboard").first
        expect(dashboard).to_be_visible(timeout=120_000)
        failed_row = dashboard.locator(".nbflow-step-failed")
        expect(failed_row).to_be_visible(timeout=180_000)
        expect(failed_row).to_contain_text("transform-data")
        _status_idle(page, timeout=240_000)
        expect(dashboard.locator(".nbflow-rootcause").first).to_contain_text("MemoryBudgetExceeded")
        # the location is the user's line in the notebook cell that defines enrich()
        expect(dashboard.locator(".nbflow-rootcause").first).to_contain_text("Cell In[")
        expect(dashboard.locator(".nbflow-rootcause").first).to_contain_text("astype(object)")
        assert page.get_by_text("Loading widget").count() == 0
        _screenshot(dashboard, ARTIFACTS / "seed-failed-dashboard.png")
        page.screenshot(path=str(ARTIFACTS / "seed-failed.png"))

        fix = dashboard.locator(".nbflow-apply-fix").first
        expect(fix).to_be_enabled(timeout=30_000)
        fix.click()
        expect(dashboard.locator(".nbflow-header")).to_contain_text("COMPLETED", timeout=240_000)
        expect(dashboard.locator(".nbflow-step-reused")).to_have_count(2)
        expect(dashboard.locator(".nbflow-step-reused").first).to_contain_text("extract-data")
        expect(dashboard.locator(".nbflow-step-completed")).to_have_count(2)
        _screenshot(dashboard, ARTIFACTS / "seed-fixed-dashboard.png")
        page.screenshot(path=str(ARTIFACTS / "seed-fixed.png"))


SLOW_CELLS = [
    "%load_ext nbflow",
    "import time\nimport pandas as pd\n\n"
    "pd.DataFrame({'x': range(600)}).to_csv('slow.csv', index=False)\n\n"
    "def crawl(df):\n    time.sleep(1.0)  # a slow chunk: 300 of them take minutes\n    return df",
    "%%workflow\nname: slow\nsteps:\n  - name: extract\n    action: data.extract\n"
    "    params: {path: slow.csv, chunk_size: 2}\n  - name: crawl\n    action: crawl\n"
    "    needs: extract\n    params: {chunk_size: 2}",
    "print('next cell ran; run status:', workflow_run.status)",
]


@pytest.fixture
def slow_lab(tmp_path):
    if not chromium_available():
        pytest.fail("Debian's chromium is missing: `apt-get install chromium` (./scripts/test does it)")
    cells = [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {},
              "outputs": [], "source": src} for i, src in enumerate(SLOW_CELLS)]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                                      "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "slow.ipynb").write_text(json.dumps(nb))
    server = JupyterLab(tmp_path, env={"PYTHONPATH": str(ROOT)}).start()
    yield server
    server.stop()


def test_cancel_button_stops_the_cells_own_run(slow_lab):
    """The %%workflow cell holds the kernel's main shell; Cancel still gets through
    (on a kernel subshell), the run ends cancelled, and the next cell runs."""
    from playwright.sync_api import expect

    with _notebook_running(slow_lab, "slow.ipynb") as page:
        dashboard = page.locator(".nbflow-dashboard").first
        # extract and crawl run as one pass: both rows read running at first
        expect(dashboard.locator(".nbflow-step-running", has_text="crawl")).to_be_visible(timeout=120_000)
        cancel = dashboard.locator(".nbflow-cancel")
        expect(cancel).to_be_enabled(timeout=30_000)
        clicked = page.evaluate("Date.now()")
        cancel.click()
        # 300 one-second chunks on two threads would take 150 s; a click that waited
        # for the cell to finish would land after all of them
        expect(dashboard.locator(".nbflow-header")).to_contain_text("CANCELLED", timeout=30_000)
        waited = (page.evaluate("Date.now()") - clicked) / 1000
        expect(page.get_by_text("next cell ran; run status: cancelled")).to_be_visible(timeout=60_000)
        expect(dashboard.locator(".nbflow-step-cancelled", has_text="crawl")).to_be_visible()
        expect(dashboard.locator(".nbflow-message")).to_contain_text("cancelled: rerun to go on")
        assert waited < 30, waited
        _screenshot(dashboard, ARTIFACTS / "cancelled-dashboard.png")
