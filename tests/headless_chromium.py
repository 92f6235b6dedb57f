"""Headless Chromium for browser tests: Debian's `chromium` and `chromium-driver`, driven by Selenium.

    driver = chromium_driver(screenshots_dir)     # installs the two packages with apt when missing
    driver.get("http://127.0.0.1:7860/"); ...; outside_requests(driver); driver.quit()

Selenium's own driver download and Playwright's browser download cannot run here, so both the
browser and its driver come from Debian (about 20 s to install, once), as tests/slurm_cluster.py
installs slurm-wlm. The browser has no network but the loopback: every host name other than
127.0.0.1 resolves to nothing, and `outside_requests` lists what the page tried to fetch from
elsewhere, so a page that needs a CDN fails the test instead of passing on a connected machine.
"""

import json
import os
import shutil
import subprocess

PACKAGES = ("chromium", "chromium-driver")
BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class ChromiumUnavailable(RuntimeError):
    """Chromium is not installed and cannot be installed here; the message says why."""


def ensure_installed() -> None:
    """apt-get install Debian's chromium and chromium-driver when either is missing."""
    if os.path.exists(BROWSER) and os.path.exists(DRIVER):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ChromiumUnavailable(f"{BROWSER} or {DRIVER} is missing and this is not a root Debian/Ubuntu machine, "
                                  f"so the test cannot apt-get install {' '.join(PACKAGES)}; install them to run it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ChromiumUnavailable(f"`{' '.join(cmd)}` failed ({done.returncode}), so there is no browser to test "
                                      f"with: {done.stderr.strip()[-500:]}")


def chromium_driver(width: int = 1280, height: int = 1400):
    """A Selenium driver for headless Chromium with the network cut off (loopback only)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_installed()
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def outside_requests(driver) -> list[str]:
    """URLs the page asked for that are neither on 127.0.0.1 nor inline (data:, blob:)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return [u for u in urls if not u.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:"))]
