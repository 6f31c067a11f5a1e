"""The seed story in real JupyterLab, driven in Debian's headless Chromium with Playwright.

Open the out-of-memory notebook, run all cells, see the dashboard (a rendered widget, not its
text fallback), the failed step and its root cause; click "Apply fix & rerun"; see the workflow
complete with the extract and validation reused. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

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


def test_seed_story_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{lab.url}/lab/tree/seed.ipynb?token={lab.token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            _status_idle(page)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()

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
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(ARTIFACTS / "seed-failed-dashboard.png"))
            page.screenshot(path=str(ARTIFACTS / "seed-failed.png"))

            fix = dashboard.locator(".nbflow-apply-fix").first
            expect(fix).to_be_enabled(timeout=30_000)
            fix.click()
            expect(dashboard.locator(".nbflow-header")).to_contain_text("COMPLETED", timeout=240_000)
            expect(dashboard.locator(".nbflow-step-reused")).to_have_count(2)
            expect(dashboard.locator(".nbflow-step-reused").first).to_contain_text("extract-data")
            expect(dashboard.locator(".nbflow-step-completed")).to_have_count(2)
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(ARTIFACTS / "seed-fixed-dashboard.png"))
            page.screenshot(path=str(ARTIFACTS / "seed-fixed.png"))
        finally:
            browser.close()
