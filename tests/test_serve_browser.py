"""The page at `/` in headless Chromium: upload an image, see the overlay; upload a non-image, see the error.

Needs `selenium` (pip) and Chromium with its driver (Debian: apt-get install chromium chromium-driver);
skipped with the reason when either is missing."""
from __future__ import annotations

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (BROWSER and DRIVER):
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def upload(browser, base: str, path: str) -> None:
    browser.get(base + "/")
    browser.find_element(By.ID, "image").send_keys(path)
    browser.find_element(By.ID, "submit").click()


def test_uploading_an_image_shows_the_overlay(browser, server, images):
    upload(browser, server[0], images["wide.png"])
    overlay = browser.find_element(By.ID, "overlay")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", overlay))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 32
    assert overlay.is_displayed()
    assert overlay.get_attribute("src").startswith("data:image/png;base64,")
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk tr")
    assert len(rows) == 5 and "class" in rows[0].text
    assert browser.find_element(By.ID, "error").text == ""


def test_uploading_a_non_image_shows_the_error(browser, server, images):
    upload(browser, server[0], images["notes.txt"])
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "not a readable image" in browser.find_element(By.ID, "error").text
