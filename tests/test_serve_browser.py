"""The page at `/` in headless Chromium: upload a photo, see the photo, overlay and heatmap at its resolution, the
colour bar and the class names; upload a corrupt file, see the error and nothing of the previous result.

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


def upload(browser, base: str, path: str, fresh: bool = True) -> None:
    """Pick the file (the page explains it as soon as it is picked)."""
    if fresh:
        browser.get(base + "/")
    field = browser.find_element(By.ID, "image")
    field.clear()
    field.send_keys(path)


def loaded(browser, element_id: str) -> bool:
    return browser.execute_script("const i = document.getElementById(arguments[0]); "
                                  "return i.complete && i.naturalWidth > 0", element_id)


def wait_for_result(browser) -> None:
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "result").is_displayed()
                                     and all(loaded(b, i) for i in ("photo", "overlay", "heatmap", "colorbar")))


def natural_size(browser, element_id: str) -> list[int]:
    return browser.execute_script("const i = document.getElementById(arguments[0]); "
                                  "return [i.naturalWidth, i.naturalHeight]", element_id)


def test_uploading_a_photo_shows_photo_overlay_colour_bar_and_class_names(browser, server, images):
    upload(browser, server[0], images["wide.png"])
    wait_for_result(browser)
    for picture in ("photo", "overlay", "heatmap"):  # at the photo's resolution (60x40), not the 32x32 input
        assert natural_size(browser, picture) == [60, 40]
        assert browser.find_element(By.ID, picture).is_displayed()
    assert browser.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png;base64,")
    assert browser.find_element(By.ID, "colorbar").is_displayed() and natural_size(browser, "colorbar")[0] == 256
    assert browser.find_element(By.ID, "scale").text.startswith(("diverging", "sequential", "relevance is 0"))
    assert browser.find_element(By.ID, "vmax").text != ""
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk tr")
    assert len(rows) == 5
    assert all(row.text.startswith("class ") and row.text.endswith("%") for row in rows)  # names, not bare indices
    assert browser.find_element(By.ID, "explained").text.startswith("wide.png: class ")
    model = browser.find_element(By.ID, "model").text
    assert "preset otsuki2024" in model and "resize 36 (bilinear), center crop 32x32" in model
    assert "10 classes" in model
    assert browser.find_element(By.ID, "error").text == ""


def test_a_corrupt_file_shows_the_error_and_the_previous_result_goes(browser, server, images):
    upload(browser, server[0], images["wide.png"])
    wait_for_result(browser)
    upload(browser, server[0], images["broken.png"], fresh=False)
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("broken.png: cannot read image")
    assert not browser.find_element(By.ID, "result").is_displayed()
    for picture in ("photo", "overlay", "heatmap", "colorbar"):
        assert browser.find_element(By.ID, picture).get_attribute("src") in (None, "")
    assert browser.find_elements(By.CSS_SELECTOR, "#topk tr") == []
    assert "wide.png" not in browser.find_element(By.TAG_NAME, "body").text
    upload(browser, server[0], images["tall.jpg"], fresh=False)  # and the next good file clears the error
    wait_for_result(browser)
    assert browser.find_element(By.ID, "error").text == "" and natural_size(browser, "overlay") == [40, 52]


def test_uploading_a_non_image_shows_the_error(browser, server, images):
    upload(browser, server[0], images["notes.txt"])
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "notes.txt: not a readable image" in browser.find_element(By.ID, "error").text


def test_dropping_a_photo_explains_it(browser, server, images):
    """A file dropped on the drop zone (a DragEvent carrying a File, as the browser makes it) is explained."""
    import base64

    browser.get(server[0] + "/")
    with open(images["tall.jpg"], "rb") as f:
        data = base64.b64encode(f.read()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true,
                                                                              cancelable: true }));
    """, data)
    wait_for_result(browser)
    assert browser.find_element(By.ID, "explained").text.startswith("dropped.jpg: class ")
    assert natural_size(browser, "overlay") == [40, 52]
    assert browser.execute_script("return document.getElementById('image').files[0].name") == "dropped.jpg"
