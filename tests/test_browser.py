"""Notebook 01 runs in JupyterLab in a real browser: no error output, figures displayed.

Starts ``jupyter lab`` (this environment's) on 127.0.0.1 with a token, on a temporary copy of ``notebooks/``
(``FLATNESS_PROFILE=smoke``, results and figures in temporary folders, so the repository is untouched), drives
headless Chromium through Selenium (Debian's ``/usr/bin/chromium`` and ``/usr/bin/chromedriver``; Selenium
Manager is never asked to download anything), clicks *Run > Run All Cells*, waits until every code cell has an
execution count and the kernel is idle, and checks the rendered page. A screenshot is saved under the test's
``tmp_path``. Skips only when Chromium, its driver or Selenium is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_boolean_prior_vs_flatness.ipynb"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
JUPYTER = Path(sys.executable).with_name("jupyter")
# Notebook 01 at smoke: ~10 s of compute on 2 idle cores, minutes when the machine is shared.
RUN_TIMEOUT_S = float(os.environ.get("FLATNESS_BROWSER_TIMEOUT_S", 300))

pytestmark = [
    pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                       reason="chromium and chromium-driver are not installed (apt-get install chromium "
                              "chromium-driver; .ci/run does it)"),
    pytest.mark.skipif(not JUPYTER.is_file(), reason=f"no jupyter next to {sys.executable}"),
]

# User settings for this JupyterLab only: every cell stays in the DOM (no windowing), no news/update pop-ups.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

STATE_JS = """
const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')];
const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
const stderr = [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.textContent);
const errors = stderr.filter(t => t.includes('Traceback') || /Error\\b/.test(t.split('\\n')[1] || ''));
const ind = document.querySelector('.jp-Notebook-ExecutionIndicator');
return {n_cells: cells.length, prompts: prompts,
        executed: prompts.filter(p => /\\[\\d+\\]/.test(p)).length,
        running: prompts.filter(p => p.includes('*')).length,
        errors: errors.map(t => t.slice(0, 2000)),
        images: document.querySelectorAll('.jp-RenderedImage img').length,
        status: ind ? ind.getAttribute('data-status') : null};
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # 127.0.0.1 only
        return json.loads(r.read() or b"null")


def _kernels_idle(base: str, token: str) -> bool:
    kernels = _get(f"{base}/api/kernels?token={token}")
    return bool(kernels) and all(k.get("execution_state") == "idle" for k in kernels)


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server on a temporary copy of notebooks/; yields (base_url, token, paths); always stopped."""
    import psutil

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        shutil.copy2(nb, nb_dir / nb.name)
    settings = tmp_path / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel uses the inline backend
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny smoke models: thread spinning on busy cores costs ~10x
    env.update(FLATNESS_PROFILE="smoke", FLATNESS_RESULTS_DIR=str(tmp_path / "results"),
               FLATNESS_FIGURES_DIR=str(tmp_path / "figures"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), PYTHONUNBUFFERED="1")
    port, token = _free_port(), "flatness-" + os.urandom(8).hex()
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(
        [str(JUPYTER), "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nb_dir}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=nb_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token, {"notebooks": nb_dir, "figures": tmp_path / "figures", "results": tmp_path / "results"}
    finally:
        # Kernels run in their own sessions: collect every descendant before stopping the server.
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        try:
            req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST", data=b"")
            urllib.request.urlopen(req, timeout=5).close()
            proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for p in family:
            try:
                p.kill()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        log.close()
        assert proc.poll() is not None and not alive, f"left running: jupyter lab {proc.pid}, {alive}"


@pytest.fixture
def chromium(tmp_path):
    """Headless Chromium through Debian's chromedriver; Selenium Manager never goes online."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_BROWSER_DOWNLOAD", "true")
    os.environ.setdefault("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _click_menu(driver, wait, menu: str, item: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-MenuBar-item')][.//div[normalize-space(text())='{menu}']]"))).click()
    wait.until(EC.element_to_be_clickable(
        (By.XPATH, f"//ul[contains(@class,'lm-Menu-content')]/li[.//div[normalize-space(text())='{item}']]"))).click()


def test_notebook_01_runs_in_jupyterlab_in_chromium(jupyter_lab, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, paths = jupyter_lab
    figures_before = sorted(p.relative_to(ROOT) for p in (ROOT / "figures").rglob("*") if p.is_file())
    driver = chromium
    wait = WebDriverWait(driver, 60)
    driver.get(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")))
    n_code = sum(c["cell_type"] == "code" for c in json.loads((ROOT / "notebooks" / NOTEBOOK).read_text())["cells"])
    # every cell rendered and the kernel started
    wait.until(lambda d: (lambda s: s["n_cells"] == n_code and s["status"] == "idle")(d.execute_script(STATE_JS)))
    state = driver.execute_script(STATE_JS)
    assert state["executed"] == 0 and not state["images"], state  # a clean notebook, nothing run yet

    _click_menu(driver, wait, "Run", "Run All Cells")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = driver.execute_script(STATE_JS)
        done = state["executed"] == state["n_cells"] and state["running"] == 0 and state["status"] == "idle"
        if done and _kernels_idle(base, token):
            break
        if state["errors"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    images = driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img")
    if images:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", images[-1])
        time.sleep(0.5)
    shot = tmp_path / "notebook01_jupyterlab.png"
    driver.save_screenshot(str(shot))

    assert not state["errors"], f"error output in the notebook (screenshot {shot}):\n" + "\n".join(state["errors"])
    assert state["executed"] == state["n_cells"], \
        f"not every cell ran within {RUN_TIMEOUT_S:.0f} s (FLATNESS_BROWSER_TIMEOUT_S): {state['prompts']} (screenshot {shot})"
    assert state["images"] >= 1 and images, f"no figure displayed (screenshot {shot})"
    assert all(driver.execute_script("return arguments[0].naturalWidth", im) > 0 for im in images), \
        "a figure did not render"
    assert shot.stat().st_size > 10_000
    # the notebook saved its figures where it was told to, and left the repository's figures/ alone
    assert list((paths["figures"] / "smoke").glob("01_*.png"))
    assert sorted(p.relative_to(ROOT) for p in (ROOT / "figures").rglob("*") if p.is_file()) == figures_before
