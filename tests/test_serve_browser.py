"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against a real uvicorn on 127.0.0.1: upload a photo, wait for the result images, keep a screenshot.

The screenshots land in tests/artifacts/ (git-ignored; CI keeps them as artefacts). Without
chromium / chromedriver / selenium the test is skipped and says what to install; CI installs them.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from _serving import make_checkpoint, photo, uvicorn_server  # noqa: E402
from council_fast.serving.app import ServeSettings, create_app  # noqa: E402
from council_fast.serving.engine import ServingEngine  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")
HOPPER = os.path.join(os.path.dirname(__file__), "data", "grace_hopper.jpg")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")

MISSING = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; CI installs them)"
if (CHROMIUM is None or CHROMEDRIVER is None) and os.environ.get("COUNCIL_FAST_REQUIRE_BROWSER") == "1":
    raise RuntimeError(MISSING + ", and COUNCIL_FAST_REQUIRE_BROWSER=1 (CI) says the browser test must run")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason=MISSING)


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="council-fast-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=390,1400")  # a phone-sized viewport
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def server(tmp_path):
    torch.set_num_threads(1)
    engine = ServingEngine(make_checkpoint(tmp_path), "tiny", device="cpu", backend="reference", max_batch=4)
    face = importlib.util.find_spec("cv2") is not None  # the face box is drawn when OpenCV is there
    with uvicorn_server(create_app(engine, ServeSettings(max_batch=4, face_crop=face))) as url:
        yield url, face


def test_upload_a_photo_and_see_the_council_answer(browser, server, tmp_path):
    url, face = server
    browser.get(url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "input.member")) == 3)
    source = HOPPER if face else str(tmp_path / "photo.png")
    if not face:
        photo(3, 80, 64).save(source)
    browser.find_element(By.ID, "file-input").send_keys(source)
    wait.until(lambda d: d.find_element(By.ID, "translate-button").is_enabled())
    styles = browser.find_element(By.ID, "styles")
    styles.clear()
    styles.send_keys("2")
    browser.find_element(By.CSS_SELECTOR, "input.member[value='1']").click()  # members 0 and 2 only
    browser.find_element(By.ID, "translate-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 4
               or "failed" in d.find_element(By.ID, "status").text)
    status = browser.find_element(By.ID, "status").text
    assert "4 images" in status, status
    images = browser.find_elements(By.CSS_SELECTOR, "#results img.result")
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                             for im in images))
    assert [im.get_attribute("alt") for im in images] == ["member 0, style 0", "member 2, style 0",
                                                          "member 0, style 1", "member 2, style 1"]
    assert all(browser.execute_script("return arguments[0].naturalWidth", im) == 32 for im in images)
    if face:
        assert "face at" in browser.find_element(By.ID, "face-note").text
    # usable on a phone: nothing wider than the viewport
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    os.makedirs(ARTIFACTS, exist_ok=True)
    assert browser.save_screenshot(os.path.join(ARTIFACTS, "serve-page.png"))
    browser.execute_script("document.getElementById('results').scrollIntoView()")
    assert browser.save_screenshot(os.path.join(ARTIFACTS, "serve-page-results.png"))
