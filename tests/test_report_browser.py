"""report.html laid out in a real browser: Debian's Chromium driven through chromedriver (selenium).

At 1400 and 420 px wide, on a real run with a bisect added in one step and on a long synthetic
run (18 prompts x 500 frames): the page never scrolls sideways, no two chart labels overlap,
every <audio> element decodes, and the first screen answers where / why / does it matter.
Skips when chromium, chromedriver or selenium is missing (.ci/apt-packages.txt installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None or not HAVE_SELENIUM,
    reason="needs chromium, chromedriver and selenium (apt-get install chromium chromium-driver; pip install -r requirements.lock)",
)
WIDTHS = (1400, 420)

# Bounding boxes of every visible SVG label, per chart; rotated labels (the bar charts' slanted
# layer names) are left out: their axis-aligned boxes overlap although the glyphs do not.
LABEL_BOXES = """
return Array.from(document.querySelectorAll('svg')).map(function (svg, i) {
  return Array.from(svg.querySelectorAll('text')).filter(function (t) {
    return !t.closest('[transform]') && !t.getAttribute('transform') && t.textContent.trim();
  }).map(function (t) {
    var r = t.getBoundingClientRect();
    return {svg: i, cls: svg.getAttribute('class'), text: t.textContent, l: r.left, r: r.right, t: r.top, b: r.bottom};
  });
});
"""

AUDIO_STATE = """
var done = arguments[arguments.length - 1];
var players = Array.from(document.querySelectorAll('audio'));
players.forEach(function (a) { a.preload = 'auto'; a.load(); });
var deadline = Date.now() + 20000;
(function poll() {
  var states = players.map(function (a) {
    return {src: a.currentSrc.slice(0, 40), ready: a.readyState, duration: a.duration, error: a.error ? a.error.code : null};
  });
  var pending = states.some(function (s) { return s.error === null && !(s.ready >= 1 && s.duration > 0); });
  if (!pending || Date.now() > deadline) done(states); else setTimeout(poll, 100);
})();
"""


def parity(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                "--disable-background-networking", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def load(driver, report: Path, width: int) -> None:
    """Open a report at a CSS viewport ``width`` px wide (headless windows have a minimum width)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    driver.get(report.resolve().as_uri())


def overflow(driver) -> dict:
    return driver.execute_script(
        "var d = document.documentElement; return {scroll: d.scrollWidth, client: d.clientWidth,"
        " wide: Array.from(document.body.querySelectorAll('*')).filter(function (e) {"
        "   var r = e.getBoundingClientRect(); return r.right > d.clientWidth + 1 && !e.closest('.scroll, .chart');"
        " }).slice(0, 5).map(function (e) { return e.tagName + '#' + e.id + '.' + e.className; })};")


def overlaps(driver) -> list[tuple[str, str, str]]:
    """Pairs of labels of one chart whose boxes overlap by more than a pixel each way."""
    bad = []
    for labels in driver.execute_script(LABEL_BOXES):
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                dx = min(a["r"], b["r"]) - max(a["l"], b["l"])
                dy = min(a["b"], b["b"]) - max(a["t"], b["t"])
                if dx > 1 and dy > 1:
                    bad.append((a["cls"], a["text"], b["text"]))
    return bad


def check_layout(driver, report: Path) -> None:
    for width in WIDTHS:
        load(driver, report, width)
        o = overflow(driver)
        assert o["scroll"] <= o["client"], f"{report.name} at {width} px scrolls sideways: {o}"
        assert not o["wide"], f"at {width} px these stick out of the page: {o['wide']}"
        bad = overlaps(driver)
        assert not bad, f"at {width} px overlapping labels: {bad[:5]}"


def check_audio(driver, report: Path) -> list[dict]:
    load(driver, report, 1400)
    states = driver.execute_async_script(AUDIO_STATE)
    assert states, "no <audio> element"
    for s in states:
        assert s["error"] is None and s["ready"] >= 1 and s["duration"] > 0, f"audio does not decode: {s}"
    return states


@pytest.fixture(scope="module")
def bisected_run(tmp_path_factory, tiny_dir):
    """A short CPU run of the bisect recipe, then `parity bisect --out` the same directory (one step)."""
    out = tmp_path_factory.mktemp("browser") / "run"
    proc = parity("run", "recipes/prompts/smoke.txt", "--recipe", "recipes/bisect-smoke.toml", "--max-frames", "6",
                  "--mos", "none", "--out", str(out), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    run_json = proc.stdout
    proc = parity("bisect", "recipes/prompts/smoke.txt", "--recipe", "recipes/bisect-smoke.toml", "--steps", "2",
                  "--out", str(out), "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return out, run_json, proc


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    from test_report_size import synthesize_run

    from parity.report import html

    run_dir = tmp_path_factory.mktemp("long")
    summary = synthesize_run(run_dir)
    summary.pop("bisect")
    html.write(summary, run_dir, run_dir / "report.html")
    return run_dir


def test_run_json_is_the_summary_on_stdout(bisected_run):
    out, run_json, _ = bisected_run
    data = json.loads(run_json)  # nothing but the JSON on stdout: engine prints went to engine.log
    assert data["run_dir"] == str(out) and data["counts"]["ran"] == 3 and "prompts" in data


def test_bisect_lands_in_the_report_in_one_step(bisected_run):
    out, _, proc = bisected_run
    data = json.loads(proc.stdout)  # --json: the bisect result and where it went
    assert data["report"] == str(out / "report.html") and "kv_quant" in data["bisect"]["verdict"]
    text = (out / "report.html").read_text(encoding="utf-8")
    verdict = text[text.index('id="bisect-verdict"'):]
    assert "kv_quant" in verdict[:400]
    assert 'id="bisect-settings"' in text and "{&#34;" not in text and '{"' not in text.split('id="bisect"')[1][:4000]
    why = text[text.index('id="why"'):text.index('id="matters"')]
    assert "bisect" in why and "kv_quant" in why


def test_real_run_layout_at_1400_and_420(browser, bisected_run):
    out, _, _ = bisected_run
    check_layout(browser, out / "report.html")


def test_real_run_audio_decodes(browser, bisected_run):
    out, _, _ = bisected_run
    states = check_audio(browser, out / "report.html")
    assert len(states) == 6
    assert all(s["src"].startswith("data:audio/mpeg") for s in states)  # embedded as MP3, and Chromium decodes it


def test_long_run_layout_at_1400_and_420(browser, long_run):
    check_layout(browser, long_run / "report.html")


def test_long_run_audio_decodes_and_says_what_is_not_in_the_file(browser, long_run):
    text = (long_run / "report.html").read_text(encoding="utf-8")
    states = check_audio(browser, long_run / "report.html")
    assert len(states) == 36
    linked = [s for s in states if not s["src"].startswith("data:")]
    assert linked  # 40 s pairs do not fit 2 MB even as MP3: they play from audio/ next to the report
    named = text.split("is not in this file")[1][:1000]
    assert all(f"p{i:03d}" in named for i in range(18))


def test_first_screen_is_on_screen(browser, bisected_run):
    out, _, _ = bisected_run
    for width in WIDTHS:
        load(browser, out / "report.html", width)
        tops = browser.execute_script(
            "return ['verdict', 'where', 'why', 'matters', 'prompts', 'fingerprint'].map(function (id) {"
            " return document.getElementById(id).getBoundingClientRect().top; });")
        assert tops == sorted(tops), tops
        if width == 1400:
            assert tops[3] < 900, "where / why / does it matter should be on the first screen"
