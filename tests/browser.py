"""The chat page in headless Chromium (Debian's chromium and chromium-driver, which `make browser`
installs): starting it, and reading what the page shows."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest


def chromium() -> Any:
    """A headless Chromium driven by selenium; skipped where none is installed, failed on CI."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        missing = "headless Chromium not installed (make test installs Debian's chromium and chromium-driver)"
        if os.environ.get("CI") == "true":  # CI must not pass a page it never opened
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def showing(browser: Any) -> dict[int, str]:
    """The answers on the page still streaming that already show some text, by position."""
    from selenium.webdriver.common.by import By

    bubbles = browser.find_elements(By.CSS_SELECTOR, ".assistant")
    return {i: b.text for i, b in enumerate(bubbles) if b.get_attribute("data-state") == "streaming" and b.text.strip()}


def done(browser: Any) -> int:
    """How many answers on the page have finished."""
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, ".assistant[data-state=done]"))


def picker(browser: Any) -> tuple[str, list[str]]:
    """The model picked in the page's model picker, and every model it offers (read in one go: the
    page replaces the options once it has asked the server for its models)."""
    value, options = browser.execute_script(
        'const s = document.getElementById("model"); return [s.value, [...s.options].map((o) => o.value)];')
    return value, options


def headings(browser: Any) -> list[str]:
    """The columns' headings, left to right (as the DOM has them, not upper-cased by the style)."""
    from selenium.webdriver.common.by import By

    return [h.get_attribute("textContent") for h in browser.find_elements(By.CSS_SELECTOR, ".column h2")]
