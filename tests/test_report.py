"""report.html of real runs, loaded in a real headless Chromium from a file:// URL.

Two runs through the CLI: the smoke recipe (the report CI uploads), and a 3-frame run whose prompt
and output path carry markup, to check that user text is escaped. The browser tests skip when no
Chromium is installed (`.ci/apt-packages.txt` lists the Debian package); the screenshot goes to
``$PARITY_ARTIFACTS`` (a temporary directory by default) for CI to keep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
XSS_TEXT = 'Say <script>alert(1)</script> & "quote" now.'
XSS_DIR = "out<img src=x onerror=alert(2)>"
CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it from .ci/apt-packages.txt)"
)


def parity(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("report-smoke") / "run"
    proc = parity("run", "recipes/prompts/smoke.txt", "--out", str(out), "--force")
    assert proc.returncode in (0, 1), proc.stderr
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def xss(tmp_path_factory, tiny_dir):
    base = tmp_path_factory.mktemp("report-xss")
    prompts = base / "prompts.txt"
    prompts.write_text(XSS_TEXT + "\n", encoding="utf-8")
    out = base / XSS_DIR
    step_summary = base / "step_summary.md"
    step_summary.write_text("earlier step\n")
    proc = parity("run", str(prompts), "--out", str(out), "--max-frames", "3", env={"GITHUB_STEP_SUMMARY": str(step_summary)})
    assert proc.returncode in (0, 1), proc.stderr
    return out, json.loads((out / "summary.json").read_text()), step_summary


class Dom(HTMLParser):
    """Elements of a page: (tag, attrs) in order, and the text inside each element with an id
    (key ``#id``) or a class (key ``.class``)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.texts: dict[str, str] = {}
        self._open: list[tuple[str, str]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        self.elements.append((tag, a))
        if tag in self.VOID:
            return
        key = f"#{a['id']}" if a.get("id") else (f".{a['class']}" if a.get("class") else "")
        self.texts.setdefault(key, "")
        self._open.append((tag, key))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        for _, key in self._open:
            if key:
                self.texts[key] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())]


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def dump_dom(report: Path, tmp: Path) -> tuple[str, str]:
    """The DOM after the page ran (5 s of virtual time for the audio to load), and the log."""
    proc = chromium("--virtual-time-budget=5000", "--dump-dom", report.resolve().as_uri(), tmp=tmp)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def external_urls(text: str) -> list[str]:
    """src/href-like attribute values that would load something from the network."""
    bad = []
    for _, attrs in Dom(text).elements:
        for key in ("src", "href", "xlink:href", "poster", "data", "action", "srcset", "background"):
            value = attrs.get(key, "").strip().lower()
            if value and not (value.startswith(("data:", "#")) or re.fullmatch(r"[a-z0-9_./%-]+", value)):
                bad.append(f"{key}={value[:80]}")
            if re.match(r"^(https?:|//|ftp:|ws:)", value):
                bad.append(f"{key}={value[:80]}")
    bad += re.findall(r"url\(\s*['\"]?(?!data:|#)[^)]*\)", text)
    bad += re.findall(r"@import|<link\b|<iframe\b", text)
    return bad


# ---- the smoke report in the browser ------------------------------------------------------------

@needs_chromium
def test_browser_renders_verdict_heatmaps_and_playable_audio(smoke, tmp_path):
    out, summary = smoke
    dom_text, log = dump_dom(out / "report.html", tmp_path)
    dom = Dom(dom_text)
    n = len(summary["prompts"])
    verdict = dom.texts["#verdict"].strip()
    assert verdict == ("PASS" if summary["passed"] else "FAIL")
    gate_names = {g["name"] for p in summary["prompts"] for g in p["gates"]}
    assert len(dom.find("tr", "gate")) == len(gate_names) and gate_names
    for name in gate_names:
        assert name in dom.texts["#gates"]
    # Two heatmaps per prompt, each an inline PNG; every first divergence boxed.
    maps = dom.find("svg", "heatmap")
    assert [m["data-component"] for m in maps] == ["talker", "predictor"] * n
    assert len([a for a in dom.find("image") if a["href"].startswith("data:image/png;base64,")]) == 2 * n
    firsts = [p for p in summary["prompts"] if p["comparison"]["first_divergence"]]
    assert len(dom.find("g", "first-divergence")) == len(firsts)
    assert len(dom.find("svg", "tokens")) == n and len(dom.find("svg", "bars")) == 2 * n
    # A/B players: embedded MP3 copies of the WAVs that Chromium decoded (the page records their
    # duration; MP3 frames pad the end by up to one frame).
    audios = dom.find("audio")
    assert [a["data-side"] for a in audios] == ["reference", "candidate"] * n
    for a, (p, side) in zip(audios, [(p, s) for p in summary["prompts"] for s in ("reference", "candidate")]):
        assert a["src"].startswith("data:audio/mpeg;base64,")
        assert "data-loaded" in a, f"{p['id']} {side}: the browser did not load the audio"
        import soundfile as sf

        assert float(a["data-loaded"]) == pytest.approx(sf.info(str(out / p["audio"][side])).duration, abs=0.1)
    assert len(dom.find("svg", "timeaxis")) == n
    assert summary["command"] in dom.texts["#rerun"]
    assert "Uncaught" not in log, [line for line in log.splitlines() if "CONSOLE" in line]


@needs_chromium
def test_browser_screenshot_is_kept_as_an_artifact(smoke, tmp_path):
    out, _ = smoke
    artifacts = Path(os.environ.get("PARITY_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report-smoke.png"
    shot.unlink(missing_ok=True)
    proc = chromium("--window-size=1100,5200", f"--screenshot={shot}", (out / "report.html").resolve().as_uri(), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 50_000, "a near-empty screenshot: the page did not render"
    print(f"screenshot: {shot}")


def test_report_is_self_contained(smoke):
    out, _ = smoke
    text = (out / "report.html").read_text(encoding="utf-8")
    assert external_urls(text) == []
    assert "http://" not in text and "https://" not in text
    assert (out / "report.html").stat().st_size <= 5_000_000


def test_external_url_check_can_fail():
    assert external_urls('<img src="https://example.com/x.png"><a href="//cdn.x/y">') != []
    assert external_urls('<style>body{background:url(http://x/y.png)}</style>') != []
    assert external_urls('<audio src="audio/p000.reference.wav"></audio><image href="data:image/png;base64,AA"/>') == []


def test_report_rerenders_identically(smoke, tmp_path):
    out, _ = smoke
    before = (out / "report.html").read_text(encoding="utf-8")
    proc = parity("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.html").read_text(encoding="utf-8") == before


def test_junit_of_the_smoke_run(smoke):
    out, summary = smoke
    root = ET.parse(out / "junit.xml").getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    expected = [(f"parity.{p['id']}", g["name"]) for p in summary["prompts"] for g in p["gates"]]
    assert [(c.get("classname"), c.get("name")) for c in cases] == expected
    failures = sum(not g["passed"] for p in summary["prompts"] for g in p["gates"])
    for element in (root, suite):
        assert int(element.get("tests")) == len(expected)
        assert int(element.get("failures")) == failures == len(suite.findall("testcase/failure"))
        assert int(element.get("errors")) == 0 and int(element.get("skipped")) == 0


# ---- user text with markup ---------------------------------------------------------------------

def test_prompt_and_path_markup_is_escaped(xss):
    out, summary, _ = xss
    text = (out / "report.html").read_text(encoding="utf-8")
    assert summary["prompts"][0]["text"] == XSS_TEXT
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img" not in text and "&lt;img src=x onerror=alert(2)&gt;" in text
    assert len(re.findall(r"<script\b", text)) == 1  # the report's own


@needs_chromium
def test_browser_shows_markup_as_text(xss, tmp_path):
    out, summary, _ = xss
    dom_text, log = dump_dom(out / "report.html", tmp_path)
    dom = Dom(dom_text)
    assert len(dom.find("script")) == 1 and dom.find("img") == []
    assert dom.texts[".prompt-text"] == XSS_TEXT
    assert XSS_DIR in dom.texts["#rerun"]
    assert "alert" not in log and "Uncaught" not in log


def test_step_summary_appended_by_the_run(xss):
    out, summary, step_summary = xss
    md = step_summary.read_text(encoding="utf-8")
    assert md.startswith("earlier step\n")  # appended, not overwritten
    assert "### parity (smoke):" in md and ("PASS" if summary["passed"] else "FAIL") in md
    assert "| p000 |" in md
    assert "<img" not in md.split("```")[0]
