"""Annotated screenshots of a report for docs/reading-a-report.md.

Opens RUN_DIR/report.html in headless Chromium (selenium + chromedriver), takes full-page
screenshots at 1400 px, crops the parts the guide explains and draws numbered boxes on them
(the numbers the guide's text refers to). Made from the README's smoke run with a bisect added:

    parity run recipes/prompts/smoke.txt --out runs/smoke
    parity bisect recipes/prompts/smoke.txt --steps 4 --out runs/smoke
    python docs/img/make_screenshots.py runs/smoke docs/img
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

WIDTH = 1400
PINK = (231, 41, 138)

# (file, element to crop to, [(number, element to box)]) - CSS selectors in report.html
SHOTS = [
    ("report-first-screen.png", "body > header, #summary", [
        (1, "#verdict"), (2, "#differs"), (3, "#random-weights"), (4, "#where"), (5, "#why"), (6, "#matters"), (7, "#gates")]),
    ("report-prompts.png", "#prompts", [(1, "#prompt-table tr:nth-child(2) td:nth-child(2)"),
                                        (2, "#prompt-table tr:nth-child(2) td:nth-child(4)"),
                                        (3, "#prompt-table tr:nth-child(2) td:nth-child(5)")]),
    ("report-bisect.png", "#bisect", [(1, "#bisect-verdict"), (2, "#bisect-settings")]),
    ("report-prompt-card.png", "#prompt-0", [(1, "#prompt-0 .hints"), (2, "#prompt-0 svg.heatmap[data-component=talker]"),
                                             (3, "#prompt-0 svg.heatmap[data-component=predictor]"),
                                             (4, "#prompt-0 svg.tokens"), (5, "#prompt-0 .players")]),
]


def driver() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def rect(d, selector: str) -> tuple[float, float, float, float] | None:
    """Page coordinates (left, top, right, bottom) of the union of the elements a selector matches."""
    return d.execute_script(
        "var rs = Array.from(document.querySelectorAll(arguments[0])).map(function (e) { return e.getBoundingClientRect(); });"
        "if (!rs.length) return null;"
        "return [Math.min.apply(null, rs.map(r => r.left)), Math.min.apply(null, rs.map(r => r.top)) + window.scrollY,"
        " Math.max.apply(null, rs.map(r => r.right)), Math.max.apply(null, rs.map(r => r.bottom)) + window.scrollY];",
        selector)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    a = ap.parse_args()
    d = driver()
    try:
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        d.get((a.run_dir / "report.html").resolve().as_uri())
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")
        font = ImageFont.load_default(size=20)
        for name, crop_sel, marks in SHOTS:
            box = rect(d, crop_sel)
            if box is None:
                print(f"skip {name}: no {crop_sel}")
                continue
            l, t, r, b = box
            l, t, r, b = max(0, l - 12), max(0, t - 12), min(WIDTH, r + 44), min(page.height, b + 12)
            img = page.crop((int(l), int(t), int(r), int(b))).copy()
            draw = ImageDraw.Draw(img)
            for number, sel in marks:
                m = rect(d, sel)
                if m is None:
                    continue
                ml, mt, mr, mb = m[0] - l - 3, m[1] - t - 3, m[2] - l + 3, m[3] - t + 3
                draw.rectangle((ml, mt, mr, mb), outline=PINK, width=3)
                cx, cy = min(img.width - 14, mr + 17), max(14, mt + 12)  # right of the box
                draw.ellipse((cx - 13, cy - 13, cx + 13, cy + 13), fill=PINK)
                draw.text((cx, cy), str(number), fill="white", font=font, anchor="mm")
            img.save(a.out_dir / name, optimize=True)
            print(f"wrote {a.out_dir / name} ({img.width}x{img.height})")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
