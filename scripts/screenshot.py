"""Screenshot an explorer page (``circuit.html`` or ``compare.html``) in headless chromium.

    .venv/bin/python scripts/screenshot.py PAGE OUT.png [--width 1400 --height 900] [--node NAME]

``--node`` clicks a node first, so that its panel (role scores, attention) is in the picture.
Needs Debian's chromium and chromium-driver and selenium (``scripts/setup.sh`` installs them
where it can), as the browser tests do.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--node", help="a node to click before the screenshot (its panel opens)")
    args = parser.parse_args()
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path) or not args.page.is_file():
        print(
            "needs chromium, chromedriver and an existing page"
            if args.page.is_file()
            else f"{args.page}: no such page",
            file=sys.stderr,
        )
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={args.width},{args.height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(args.page.resolve().as_uri())
        deadline = time.monotonic() + 60
        while not driver.execute_script("return document.body && document.body.dataset.ready === '1'"):
            if time.monotonic() > deadline:
                print(f"{args.page}: the page did not get ready in 60 s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        if args.node:
            driver.execute_script(
                "const n = window.explorer.cy.getElementById(arguments[0]); n.emit('tap');", args.node
            )
            time.sleep(0.5)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
