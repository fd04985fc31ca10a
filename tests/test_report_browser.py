"""Issue 18: the HTML report in a real browser (headless Chromium driven by Selenium), opened from disk by a
file:// URL as a reader would: every image of the index and of an image page loads, a click on a Table 1 header
sorts on the means (the first row is the method table1.csv says is lowest, then highest), a worst-case link
leads to an image page whose overlay has a requested box per subject and whose toggles hide them, and the
gallery link leads to a gallery whose tiles open image pages."""

from __future__ import annotations

import pandas as pd

import runfolder

from .conftest import needs_browser

pytestmark = needs_browser


def wait_images_loaded(driver) -> list[str]:
    """Scrolls through the page (lazy images load near the viewport), waits until every <img> is complete and
    returns the sources of those that did not decode (naturalWidth 0)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("document.querySelectorAll('img').forEach(function (i) { i.scrollIntoView(); });")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return Array.from(document.images).every(function (i) { return i.complete; });"))
    return driver.execute_script(
        "return Array.from(document.images).filter(function (i) { return i.naturalWidth === 0; })"
        ".map(function (i) { return i.getAttribute('src'); });")


def first_method(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#table1-table tbody tr td").text


def test_index_sorts_and_links_to_image_pages_and_galleries(browser, reported_run):
    from selenium.webdriver.common.by import By

    out = reported_run / "report"
    browser.get((out / "index.html").as_uri())
    assert "TINY RANDOM MODELS" in browser.find_element(By.ID, "tiny-banner").text
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 2 and any(i.get_attribute("src").endswith("fig4.png") for i in images)
    assert wait_images_loaded(browser) == []

    # sorting Table 1 on mIoU: lowest mean first, then highest (from table1.csv, not from the page)
    table1 = pd.read_csv(out / "table1.csv")
    lowest = table1.loc[table1["iou"].idxmin(), "method"]
    highest = table1.loc[table1["iou"].idxmax(), "method"]
    assert lowest != highest
    header = next(h for h in browser.find_elements(By.CSS_SELECTOR, "#table1-table thead th") if h.text.startswith("mIoU"))
    header.click()
    assert first_method(browser) == lowest and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert first_method(browser) == highest and header.get_attribute("aria-sort") == "descending"

    # a worst-case link -> that image's page
    link = browser.find_element(By.CSS_SELECTOR, "#worst-lowest_miou tbody a")
    target = link.get_attribute("href")
    link.click()
    assert browser.current_url == target
    method, combination, seed = target.split("/report/images/")[1].removesuffix(".html").split("/")
    record = next(r for r in runfolder.read_records(reported_run)
                  if (r["method"], r["combination"], str(r["seed"])) == (method, combination, seed))
    assert wait_images_loaded(browser) == []
    requested = browser.find_elements(By.CSS_SELECTOR, "#stage .box.requested")
    assert len(requested) == len(record["subjects"]) == record["n_subjects"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.region-crop")) == record["n_subjects"]
    assert record["prompt"] in browser.find_element(By.CSS_SELECTOR, ".prompt").text
    browser.find_element(By.ID, "show-requested").click()  # the toggle hides the requested boxes
    assert not any(b.is_displayed() for b in requested)

    # the gallery link -> the method's gallery, whose tiles load and open image pages
    browser.find_element(By.LINK_TEXT, method).click()
    assert browser.current_url.endswith(f"/report/methods/{method}.html")
    tiles = browser.find_elements(By.CSS_SELECTOR, "a.tile")
    assert len(tiles) == sum(r["method"] == method for r in runfolder.read_records(reported_run))
    assert all(i.get_attribute("loading") == "lazy" for i in browser.find_elements(By.CSS_SELECTOR, "a.tile img"))
    assert wait_images_loaded(browser) == []
    tiles[-1].click()
    assert "/report/images/" in browser.current_url
    assert wait_images_loaded(browser) == []
    browser.find_element(By.LINK_TEXT, "Report").click()
    assert browser.current_url.endswith("/report/index.html")
