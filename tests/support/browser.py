"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

import pytest

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1100"]


@contextmanager
def chromium(width: int = 1280, height: int = 1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium / chromedriver are missing: run `make test`, which installs them")
    profile = tempfile.mkdtemp(prefix="voxbox-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    browser.set_window_size(width, height)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
