"""The built book read in a real browser: Debian's Chromium, driven by Playwright.

One fast-mode build (``BCLIB_FAST=1 jupyter-book build``) into a temporary folder, or the
built HTML that ``BCLIB_BOOK_HTML`` names (a ``_build/html`` folder), is served on 127.0.0.1
and every page of ``_toc.yml`` is opened. Each page must: typeset its maths (MathJax containers,
no raw ``$$``, ``\\(`` or ``$\\`` in the visible text, wide display equations scrolling
from their start), show every code block whole at a 1280-pixel width (no line wider than the
column, none scrolling), show every jshtml animation's frames,
render the widget views whose state it stores (a slider where a slider is stored), show no raw
Markdown table and no traceback, raise no JavaScript error, load its inline figures at high dpi,
ask for no file the book lacks, name ``_config.yml``'s repository in its Binder and Colab links
(chapters) and request nothing outside 127.0.0.1 (every request is recorded; external ones are refused
and fail the test). Full-page screenshots of chapters 4, 5 and 8 go to ``BCLIB_SCREENSHOTS``
(default: a temporary folder, printed).

Skipped, with the reason, without Chromium (``apt-get install chromium``; ``BCLIB_CHROMIUM``
names another binary) or the ``playwright`` package. No browser is ever downloaded.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 3600  # the whole fast-mode book on 2 CPU cores
PAGE_TIMEOUT_MS = 120_000  # load, MathJax and widgets of one long page on a busy machine
SCREENSHOT_PAGES = ("book/04_training_lenet", "book/05_pruning_precision", "book/08_horseshoe")
RETINA = 1.5  # an inline figure's pixels per displayed CSS pixel, at least


def repository_slug() -> str:
    """``owner/name`` of ``_config.yml``'s ``repository.url``, which the launch buttons name."""
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    return urlparse(url).path.strip("/").removesuffix(".git")


def toc_pages() -> list[str]:
    """Every page of ``_toc.yml`` (root first), as docnames such as ``book/01_mdl``."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in [toc] + toc.get("parts", []):
        stack = list(part.get("chapters", []))
        while stack:
            entry = stack.pop(0)
            pages.append(entry["file"])
            stack[:0] = entry.get("sections", [])
    return pages


def chromium_path() -> str | None:
    """The system Chromium: ``BCLIB_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH."""
    named = os.environ.get("BCLIB_CHROMIUM")
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(f"BCLIB_CHROMIUM={named} is not a file; unset it to use chromium on PATH")
        return named
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                        "(pip install -r requirements.txt)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    return path


@pytest.fixture(scope="session")
def book_html(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built book's HTML folder: ``BCLIB_BOOK_HTML``, else a fresh fast-mode build."""
    named = os.environ.get("BCLIB_BOOK_HTML")
    if named:
        html = Path(named)
        if not (html / "index.html").is_file():
            raise FileNotFoundError(f"BCLIB_BOOK_HTML={named} holds no index.html; point it at a "
                                    "built book's _build/html or unset it to build one")
        return html
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [str(jupyter_book if jupyter_book.exists() else "jupyter-book"), "build", str(ROOT),
               "--path-output", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, env={**os.environ, "BCLIB_FAST": "1"}, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    print(f"fast-mode book build: {time.monotonic() - started:.0f} s into {out}")
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-5000:]}"
    return out / "_build" / "html"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # no access log in the test output
        pass


@pytest.fixture(scope="session")
def server(book_html: Path) -> Iterator[str]:
    """The book served on a free port of 127.0.0.1, for this test session only."""
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(book_html)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("BCLIB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# Visible text outside code, scripts and typeset maths, one string per text node.
VISIBLE_TEXT_JS = """() => {
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, .MathJax';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const out = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(skip) || !el.checkVisibility()) continue;
    if (n.textContent.trim()) out.push(n.textContent);
  }
  return out;
}"""

# Display equations a reader cannot see whole: content left of the column (out of reach) or
# past its right edge without a scroll bar.
CUT_EQUATIONS_JS = """() => Array.from(document.querySelectorAll('mjx-container[display="true"]'))
  .filter(c => c.checkVisibility())
  .map(c => { const box = c.getBoundingClientRect(), column = c.closest('section, article').getBoundingClientRect();
              const scrolls = ['auto', 'scroll'].includes(getComputedStyle(c).overflowX);
              return {text: c.textContent.slice(0, 60), left: box.left < column.left - 1,
                      right: box.right > column.right + 1 || (c.scrollWidth > c.clientWidth + 1 && !scrolls)}; })
  .filter(e => e.left || e.right)"""

# Code blocks a reader cannot see whole at this window's width: wider than the column when
# kept unwrapped (a line over tests/test_book_config.py's limit), or scrolling as styled.
WIDE_CODE_JS = """() => Array.from(document.querySelectorAll(
    'div.cell_input pre, div.highlight-python pre, div.highlight-bash pre'))
  .filter(p => p.checkVisibility())
  .map(p => { const scrolls = p.scrollWidth > p.clientWidth + 1;
              const wrap = p.style.whiteSpace; p.style.whiteSpace = 'pre';
              const wide = p.scrollWidth > p.clientWidth + 1; p.style.whiteSpace = wrap;
              return {text: p.textContent.slice(0, 60), scrolls, wide}; })
  .filter(c => c.scrolls || c.wide)"""

# Per stored widget view: did the manager render something in its output area?
WIDGET_VIEWS_JS = """() => Array.from(
  document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'),
  s => { const area = s.closest('.output, .cell_output') || s.parentElement;
         return { model: JSON.parse(s.textContent).model_id,
                  rendered: area.querySelectorAll('.jupyter-widgets, .widget-container, .lm-Widget').length,
                  sliders: area.querySelectorAll('.widget-slider, .widget-hslider, .widget-vslider').length }; })"""

STORED_SLIDERS_JS = """() => {
  let n = 0;
  for (const s of document.querySelectorAll('script[type="application/vnd.jupyter.widget-state+json"]'))
    for (const m of Object.values(JSON.parse(s.textContent).state))
      if (/Slider(View)?$/.test(m.state._view_name || '')) n += 1;
  return n;
}"""

# Inline figures (not animation frames) that the page shows: pixels vs displayed CSS pixels.
FIGURES_JS = """() => Array.from(document.querySelectorAll('.cell_output img'))
  .filter(i => !i.closest('.animation') && i.clientWidth > 0 && /\\.png$/.test(i.src))
  .map(i => ({src: i.src.split('/').pop(), natural: i.naturalWidth, shown: i.clientWidth}))"""


def visible_lines(page) -> list[str]:
    return [line.strip() for text in page.evaluate(VISIBLE_TEXT_JS) for line in text.splitlines() if line.strip()]


def typeset(page) -> tuple[int, int]:
    """Wait for MathJax's first pass; (maths elements Sphinx wrote, those left untypeset)."""
    n_maths = page.locator(".math").count()
    if n_maths:
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=PAGE_TIMEOUT_MS)
        page.evaluate("() => MathJax.startup.promise")
    return n_maths, page.locator(".math:not(:has(mjx-container))").count()


def check_animations(page) -> list[str]:
    """Every jshtml animation shows a frame, and its last frame differs from its first."""
    problems = []
    for i, anim in enumerate(page.locator("div.animation").all()):
        img, slider = anim.locator("img").first, anim.locator("input.anim-slider").first
        first = img.get_attribute("src") or ""
        frames = int(slider.get_attribute("max") or 0) + 1
        if not first.startswith("data:image") or img.evaluate("i => i.naturalWidth") == 0:
            problems.append(f"animation {i}: no frame shown")
            continue
        if frames < 2:
            problems.append(f"animation {i}: {frames} frame")
            continue
        anim.get_by_title("Last frame").click()
        if img.get_attribute("src") == first:
            problems.append(f"animation {i}: the last of {frames} frames shows the first")
    return problems


@pytest.mark.parametrize("docname", toc_pages())
def test_page_in_browser(docname: str, server: str, browser, screenshots: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    external: list[str] = []

    def route(r) -> None:  # record every request; refuse those leaving 127.0.0.1
        url = r.request.url
        requests.append(url)
        if urlparse(url).scheme in ("http", "https", "ws", "wss") and urlparse(url).hostname != "127.0.0.1":
            external.append(url)
            r.abort()
        else:
            r.continue_()

    context.route("**/*", route)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    missing: list[str] = []  # files the page asks for that the book lacks (browsers ask for a favicon)
    page.on("response", lambda r: missing.append(f"{r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    try:
        response = page.goto(f"{server}/{docname}.html", wait_until="load", timeout=PAGE_TIMEOUT_MS)
        assert response is not None and response.ok, f"{docname}.html: HTTP {response and response.status}"
        n_maths, untypeset = typeset(page)
        views = page.evaluate(WIDGET_VIEWS_JS)
        if views:  # the manager renders after the page's load event
            page.wait_for_function(
                "n => document.querySelectorAll('.jupyter-widgets, .widget-container').length >= n",
                arg=len(views), timeout=PAGE_TIMEOUT_MS)
            views = page.evaluate(WIDGET_VIEWS_JS)
        stored_sliders = page.evaluate(STORED_SLIDERS_JS)
        lines = visible_lines(page)
        cut_equations = page.evaluate(CUT_EQUATIONS_JS)
        wide_code = page.evaluate(WIDE_CODE_JS)
        figures = page.evaluate(FIGURES_JS)
        full_text = page.inner_text("body")
        launch = page.eval_on_selector_all(
            'a[href*="mybinder.org"], a[href*="colab.research.google.com"]', "as => as.map(a => a.href)")
        if docname in SCREENSHOT_PAGES:  # before the animation check moves the frames
            shot = screenshots / f"{Path(docname).name}.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        animations = check_animations(page)
    finally:
        context.close()

    problems = []  # every failed check of the page, reported together
    if external:
        problems.append(f"requests leaving 127.0.0.1: {sorted(set(external))}")
    if missing:
        problems.append(f"requests the book cannot answer: {missing[:5]}")
    if errors:
        problems.append(f"JavaScript errors: {errors}")
    if untypeset:
        problems.append(f"{untypeset} of {n_maths} maths elements not typeset")
    if cut_equations:
        problems.append(f"display equations cut at the column's edge: {cut_equations[:3]}")
    if wide_code:
        problems.append(f"code blocks wider than the column: {wide_code[:3]}")
    raw_maths = [line for line in lines if "$$" in line or "\\(" in line or "\\[" in line
                 or re.search(r"\$\\[A-Za-z]", line)]
    if raw_maths:
        problems.append(f"raw TeX in the visible text: {raw_maths[:5]}")
    raw_tables = [line for line in lines if re.match(r"\|.*-{3,}\s*\|", line)]
    if raw_tables:
        problems.append(f"raw Markdown tables: {raw_tables[:3]}")
    if "Traceback (most recent call last)" in full_text:
        problems.append("a traceback is shown")
    problems += animations
    unrendered = [v["model"] for v in views if v["rendered"] == 0]
    if unrendered:
        problems.append(f"widget views not rendered: {unrendered}")
    if stored_sliders and sum(v["sliders"] for v in views) == 0:
        problems.append(f"{stored_sliders} slider models stored, no slider shown")
    blurry = [f for f in figures if f["natural"] < RETINA * f["shown"]]
    if blurry:
        problems.append(f"figures below {RETINA} px per CSS px: {blurry[:3]}")
    if (ROOT / f"{docname}.ipynb").exists():  # the header's Binder and Colab buttons, the badge
        slug = repository_slug()
        wrong = [href for href in launch if slug not in href]
        if len(launch) < 2 or wrong:
            problems.append(f"launch links not naming {slug}: {wrong or launch}")
    if not any(urlparse(u).path.endswith(f"{docname}.html") for u in requests):
        problems.append("the request recorder did not see the page itself")
    assert not problems, f"{docname}:\n" + "\n".join(problems)
