"""The browser editor end to end: `ssic serve` on loopback, real headless Chromium driven by Selenium.

Paints one stroke on the GauGAN label map and checks that the output changes, only near the stroke,
that the edit's time and the dense time are shown, and takes a screenshot (written to
docs/images/editor.png too when SSIC_EDITOR_SCREENSHOT is set to that path).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="pip install 'ssic[serve]'")
selenium = pytest.importorskip("selenium", reason="pip install selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_artefact):
    from ssic.serve import server as srv

    info = srv.start(str(tiny_artefact("gaugan")), replicas=1, port=_free_port(), cache_budget_mb=200, num_cpus=2)
    yield info
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1140,600", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _canvas(driver, cid: str) -> np.ndarray:
    from PIL import Image

    url = driver.execute_script(f"return document.getElementById('{cid}').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)


def test_paint_a_stroke(server, browser, tmp_path):
    browser.get(server["url"] + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert browser.find_element(By.ID, "error").text == ""
    before = _canvas(browser, "after")
    assert before.shape == (256, 512, 3) and before.std() > 0  # the primed output is drawn

    canvas = browser.find_element(By.ID, "input")
    size = canvas.size
    # 1 CSS pixel = 1 model pixel inside a 1 px border (offsets below are from the element's centre)
    assert (canvas.get_attribute("clientWidth"), canvas.get_attribute("clientHeight")) == ("512", "256")
    # a horizontal stroke from (x=100, y=60) to (x=160, y=60) in model pixels, brush 12 px
    x0, y0, x1 = 100, 60, 160
    ActionChains(browser).move_to_element_with_offset(canvas, x0 - size["width"] // 2, y0 - size["height"] // 2) \
        .click_and_hold().move_by_offset(20, 0).move_by_offset(20, 0).move_by_offset(x1 - x0 - 40, 0) \
        .release().perform()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-edits") == "1"
               and d.find_element(By.ID, "status").text == "ready")
    assert browser.find_element(By.ID, "error").text == ""

    timing = browser.find_element(By.ID, "timing").text
    assert re.search(r"^sparse \d+\.\d ms \(\d+\.\d% of tiles\) · dense \d+\.\d ms", timing), timing

    after = _canvas(browser, "after")
    changed = np.abs(after - before).max(axis=2) > 0
    ys, xs = np.nonzero(changed)
    assert len(ys) > 50, "the stroke did not change the output"
    # near the stroke only: inside its box grown by a margin that covers the tiles and mask dilation
    margin = 48
    assert ys.min() >= y0 - 6 - margin and ys.max() <= y0 + 6 + margin, (ys.min(), ys.max())
    assert xs.min() >= x0 - 6 - margin and xs.max() <= x1 + 6 + margin, (xs.min(), xs.max())
    assert changed.mean() < 0.15

    # the before/after slider shows the before image on the right part
    browser.execute_script("const s = document.getElementById('slider'); s.value = 25;"
                           "s.dispatchEvent(new Event('input'));")
    assert "inset(0px 75%" in browser.find_element(By.ID, "after").value_of_css_property("clip-path")
    browser.execute_script("const s = document.getElementById('slider'); s.value = 100;"
                           "s.dispatchEvent(new Event('input'));")
    time.sleep(0.2)

    shot = tmp_path / "editor.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    target = os.environ.get("SSIC_EDITOR_SCREENSHOT")
    if target:
        shutil.copy(shot, target)


def test_commit_button(server, browser):
    # after the stroke above, Commit makes the last output the new "before"
    button = browser.find_element(By.ID, "commit")
    if not button.is_enabled():
        pytest.skip("needs the stroke of test_paint_a_stroke")
    button.click()
    WebDriverWait(browser, 60).until(lambda d: not d.find_element(By.ID, "commit").is_enabled())
    assert browser.find_element(By.ID, "error").text == ""
    assert np.array_equal(_canvas(browser, "before"), _canvas(browser, "after"))
