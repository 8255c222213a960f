"""Notebook 09 in a real browser: JupyterLab on a free local port, headless Chromium driven by Selenium.

The notebook (a copy, parametrised to quick mode) is opened and run, a caption is typed into the
multi-turn widget, a result is clicked and the test reads from the page that the next turn's reference
changed, then accepts a result. Screenshots go to ``data/quick/figures/09_browser_*.png``. With
``CIRLIB_README_SCREENSHOT=1`` the notebook runs in full mode instead (the course's models, several
minutes) and the widget's second turn replaces ``figures/09_multiturn_widget.png``, the README's picture.

Chromium comes from Debian (``chromium`` and ``chromium-driver``), installed with apt when the tests run
as root and it is missing, as ``make`` installs the Fashion-MNIST package; Selenium drives the system
chromedriver (never a browser or driver of its own: Selenium Manager is kept offline). Without them the
test is skipped with a message saying what to install. Quick-mode artifacts must exist (the quick
notebook runs of ``make test`` write them first).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "09_explore.ipynb"
PACKAGES = ("chromium", "chromium-driver")
BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
README_SCREENSHOT = os.environ.get("CIRLIB_README_SCREENSHOT") == "1"
RUN_TIMEOUT_S = 1200 if README_SCREENSHOT else 240  # the notebook under JupyterLab on a busy 2-core CPU

pytestmark = pytest.mark.slow


def _chromium() -> tuple[str, str] | None:
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which(DRIVER) or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (browser, driver) if browser and driver else None


def _apt_install() -> str:
    """Install Debian's Chromium and its driver; what went wrong, or "" on success."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root, so apt cannot install them"
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for attempt in (install, ["apt-get", "update", "-qq"], install):  # update only when the index is stale
        result = subprocess.run(attempt, capture_output=True, text=True, env=env, timeout=900)
        if attempt is install and result.returncode == 0:
            return ""
    return f"apt-get install failed: {result.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """``(browser, chromedriver)`` paths of the system Chromium, installed with apt if need be."""
    found = _chromium()
    if found is None:
        problem = _apt_install()
        found = _chromium()
        if found is None:
            pytest.skip(f"the browser test needs Debian's {' and '.join(PACKAGES)} "
                        f"(apt-get install {' '.join(PACKAGES)}); {problem or 'installed, but not found on PATH'}")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path: Path):
    """A JupyterLab server on a free port with a token and its own runtime and config folders,
    serving a copy of notebook 09 parametrised to quick mode. Yields ``(url, token)``."""
    import nbformat

    if not (ROOT / "data" / "quick" / "checkpoints" / "tiny_clip.safetensors").exists():
        pytest.skip("notebook 09 needs the quick-mode artifacts: run the quick notebooks first (make test does)")
    work = tmp_path / "lab"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert re.match(r"quick = False$", parameters.source, flags=re.M), f"{NOTEBOOK.name}: quick = False first"
    if not README_SCREENSHOT:
        parameters.source = parameters.source.replace("quick = False", "quick = True", 1)
    nbformat.write(notebook, work / NOTEBOOK.name)
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    # no "would you like news?" toast over the page
    (config / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    port, token = _free_port(), os.urandom(16).hex()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(config),
           "CIRLIB_ROOT": str(ROOT)}
    log = open(tmp_path / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.expose_app_in_browser=True"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser(chromium):
    """Headless Chromium under Selenium, with the system chromedriver (Selenium Manager kept offline)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the [test] extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_multiturn_widget_in_jupyterlab(jupyter_lab, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, token = jupyter_lab
    shots = ROOT / "data" / "quick" / "figures"
    shots.mkdir(parents=True, exist_ok=True)
    browser.get(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.execute_script(
        "const app = window.jupyterapp; const panel = app && app.shell.currentWidget;"
        "return !!(panel && panel.sessionContext && panel.sessionContext.session"
        " && panel.sessionContext.session.kernel && panel.content && panel.content.widgets.length);"))
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    def finished(driver) -> bool:  # every code cell executed, none running or queued
        prompts = [p.text for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]
        return bool(prompts) and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts)

    WebDriverWait(browser, RUN_TIMEOUT_S, poll_frequency=1).until(finished)
    errors = browser.find_elements(By.CSS_SELECTOR, '[data-mime-type="application/vnd.jupyter.error"]')
    assert not errors, errors[0].text[:2000]

    explorer = browser.find_element(By.CSS_SELECTOR, ".cirlib-explorer")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer)
    assert "target rank" in explorer.text
    explorer.screenshot(str(shots / "09_browser_explorer.png"))

    widget = browser.find_element(By.CSS_SELECTOR, ".cirlib-multiturn")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)
    reference = widget.find_element(By.CSS_SELECTOR, ".cirlib-reference-name")
    start = reference.text
    assert start, "the multi-turn widget shows no reference"

    caption = widget.find_element(By.CSS_SELECTOR, ".cirlib-caption input")
    caption.send_keys("is navy blue and has stripes", Keys.ENTER)

    def label(card) -> list[str]:  # "#rank · score", then the image's name
        return card.find_element(By.CSS_SELECTOR, ".cirlib-result-label").text.splitlines()

    def shown_results(_driver):  # the six result cards of the notebook's widget (k = 6), each drawn
        cards = [c for c in widget.find_elements(By.CSS_SELECTOR, ".cirlib-result") if c.is_displayed()]
        return cards if len(cards) == 6 and all(len(label(c)) == 2 for c in cards) else False

    cards = WebDriverWait(browser, 60).until(shown_results)
    assert "Is this what you were looking for?" in widget.text
    widget.screenshot(str(shots / "09_browser_results.png"))

    chosen = label(cards[1])[1].strip()
    cards[1].find_element(By.CSS_SELECTOR, ".cirlib-choose").click()
    WebDriverWait(browser, 60).until(lambda _d: reference.text != start)
    assert reference.text == chosen, (start, reference.text, chosen)  # the clicked result is the next reference
    assert "What do you want to change?" in widget.text

    caption.send_keys("has a star print", Keys.ENTER)
    cards = WebDriverWait(browser, 60).until(shown_results)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)
    widget.screenshot(str(shots / "09_browser_second_turn.png"))  # results, and the first turn in the history
    cards[0].find_element(By.CSS_SELECTOR, ".cirlib-accept").click()
    WebDriverWait(browser, 60).until(lambda _d: "Found" in widget.text)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", widget)
    widget.screenshot(str(shots / "09_browser_accepted.png"))
    browser.save_screenshot(str(shots / "09_browser_page.png"))
    history = widget.find_elements(By.CSS_SELECTOR, ".cirlib-history-turn")
    assert len(history) == 2 and chosen in history[0].text
    if README_SCREENSHOT:
        shutil.copy(shots / "09_browser_second_turn.png", ROOT / "figures" / "09_multiturn_widget.png")
