"""The HTML pages in a real browser: headless Chromium, driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (the protocol over two inherited file
descriptors: no port, no network, no Python dependency beyond the standard library) and a
throw-away profile. Each page is loaded from a ``file://`` URL; the test fails on any console
error, uncaught exception or failed resource load, checks that the charts and the results
table are there, clicks a column header (a real mouse event at its position) and checks the
rows come back sorted, types into the filter, and saves screenshots (screen and print media)
under the test's temporary directory.

Skips, with the reason, when no Chromium is installed (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "chrome")
LOAD_TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for name in CHROMIUM_CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


class BrowserError(Exception):
    pass


def _high_fd(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered 10 or more (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium with one page, spoken to over the DevTools protocol on a pipe."""

    def __init__(self, executable: str, width: int = 1366, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="bench-chromium-")
        # the child's ends are moved above 10 first, so that putting them on 3 and 4 cannot clobber each other
        to_child_r, self._to_child = (_high_fd(fd) for fd in os.pipe())
        self._from_child, from_child_w = (_high_fd(fd) for fd in os.pipe())
        self.log_path = Path(self.profile) / "chromium.log"
        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank",
        ]

        def wire_fds():  # the protocol's fixed descriptors: 3 = commands in, 4 = replies out
            os.dup2(to_child_r, 3)  # dup2 leaves the copies inheritable; the originals close on exec
            os.dup2(from_child_w, 4)

        with open(self.log_path, "wb") as log:
            # close_fds=False: it would close 3 and 4 again; Python's own descriptors are close-on-exec anyway
            self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=wire_fds, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=True)
        self.resize(width, height)

    # -- protocol -----------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("no answer from Chromium in time; its log: " + self.log_tail())
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the pipe; its log: " + self.log_tail())
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for_event(self, method: str, timeout: float = LOAD_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event["method"] == method:
                    return event
            seen = len(self.events)
            message = self._read_message(deadline)
            if "method" in message:
                self.events.append(message)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    # -- page ---------------------------------------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=True)
        self.wait_for_event("Page.loadEventFired")
        self.evaluate("document.fonts ? document.fonts.ready.then(() => true) : true")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1}, session=True)

    def type_text(self, selector: str, text: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text}, session=True)

    def screenshot(self, path: Path, full_page: bool = True, media: str = "screen") -> Path:
        self.call("Emulation.setEmulatedMedia", {"media": media}, session=True)
        params: dict = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.call("Page.captureScreenshot", params, session=True, timeout=60)["data"]
        self.call("Emulation.setEmulatedMedia", {"media": ""}, session=True)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def print_pdf(self, path: Path) -> Path:
        data = self.call("Page.printToPDF", {"printBackground": True, "preferCSSPageSize": True}, session=True,
                         timeout=120)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the page was opened."""
        out = []
        failed_requests = {}
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("uncaught exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log error ({p['entry'].get('source')}): {p['entry'].get('text')} "
                           f"{p['entry'].get('url', '')}")
            elif m == "Network.requestWillBeSent":
                failed_requests[p["requestId"]] = p["request"]["url"]
            elif m == "Network.loadingFailed":
                url = failed_requests.get(p.get("requestId"), "?")
                out.append(f"failed to load {url}: {p.get('errorText')}"
                           f"{' (blocked)' if p.get('blockedReason') else ''}")
            elif m == "Network.responseReceived" and p.get("response", {}).get("status", 200) >= 400:
                out.append(f"HTTP {p['response']['status']} for {p['response'].get('url')}")
        return out

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


CHROMIUM = find_chromium()
#: CI sets BENCH_REQUIRE_BROWSER=1 so that a missing Chromium fails the run instead of skipping it.
REQUIRED = os.environ.get("BENCH_REQUIRE_BROWSER", "") not in ("", "0")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not REQUIRED,
    reason="no Chromium found (install Debian's 'chromium' package, or set CHROMIUM=/path/to/chrome); "
    ".ci/run installs it",
)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("BENCH_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium)")
    b = Chromium(CHROMIUM)
    yield b
    b.close()


@pytest.fixture(scope="module")
def report_page(tiny_run):
    return tiny_run / "report.html"


def _column_values(browser: Chromium, table: str, column: int) -> list:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll('#{table} tbody tr')).filter(r => r.style.display !== 'none')"
        f".map(r => {{ const c = r.cells[{column}]; const s = c.getAttribute('data-sort');"
        " return s === null ? c.textContent.trim() : (s === '' ? null : Number(s)); })"
    )


def _header_index(browser: Chromium, table: str, text: str) -> int:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll('#{table} thead th')).findIndex(th => th.textContent.trim()"
        f".toLowerCase().startsWith({json.dumps(text)}))"
    )


@needs_chromium
def test_run_report_in_chromium(browser, report_page, tmp_path):
    browser.open(report_page)
    assert browser.problems() == [], browser.problems()
    assert browser.requested_urls() == [report_page.resolve().as_uri()]  # nothing else is fetched
    assert browser.evaluate("document.title").startswith("Attention Bench")

    # charts: every one an inline SVG that was laid out with a real size, with a title
    charts = browser.evaluate(
        "Array.from(document.querySelectorAll('svg.chart')).map(s => { const r = s.getBoundingClientRect();"
        " return {w: r.width, h: r.height, label: s.getAttribute('aria-label'), section: s.closest('section').id}; })"
    )
    sections = {c["section"] for c in charts}
    assert {"scaling", "speed-accuracy"} <= sections
    assert all(c["w"] > 400 and c["h"] > 150 and c["label"] for c in charts), charts
    for section in ("scaling", "crossovers", "throughput", "speed-accuracy", "results", "problems"):
        assert browser.evaluate(f"!!document.getElementById('{section}')"), section

    # the results table: every row there, sorting by a click on the time header
    n_rows = browser.evaluate("document.querySelectorAll('#results-table tbody tr').length")
    assert n_rows == 20
    col = _header_index(browser, "results-table", "time")
    assert col > 0
    browser.click(f"#results-table thead th:nth-child({col + 1})")
    assert browser.evaluate(f"document.querySelectorAll('#results-table thead th')[{col}].getAttribute('aria-sort')") \
        == "ascending"
    values = _column_values(browser, "results-table", col)
    numbers = [v for v in values if v is not None]
    assert len(numbers) == 16 and numbers == sorted(numbers)
    assert values[len(numbers):] == [None] * (n_rows - len(numbers))  # rows without a time go last
    browser.click(f"#results-table thead th:nth-child({col + 1})")
    values = [v for v in _column_values(browser, "results-table", col) if v is not None]
    assert values == sorted(values, reverse=True)

    # sorting a text column
    variant_col = _header_index(browser, "results-table", "variant")
    browser.click(f"#results-table thead th:nth-child({variant_col + 1})")
    names = _column_values(browser, "results-table", variant_col)
    assert names == sorted(names, key=str.lower)

    # the filter: every word must match
    browser.type_text("#filter", "sliding causal")
    visible = browser.evaluate(
        "Array.from(document.querySelectorAll('#results-table tbody tr')).filter(r => r.style.display !== 'none')"
        ".map(r => r.textContent)"
    )
    assert len(visible) == 2 and all("sliding_window" in t for t in visible)
    assert browser.evaluate("document.getElementById('filter-count').textContent") == "2 of 20 rows"
    browser.evaluate("(() => { const f = document.getElementById('filter'); f.value = '';"
                     " f.dispatchEvent(new Event('input')); })()")

    shot = browser.screenshot(tmp_path / "report.png")
    printed = browser.screenshot(tmp_path / "report-print.png", media="print")
    pdf = browser.print_pdf(tmp_path / "report.pdf")
    assert shot.stat().st_size > 10_000 and printed.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF")
    assert browser.problems() == [], browser.problems()
    print(f"screenshots: {shot} {printed} {pdf}", file=sys.stderr)


@needs_chromium
def test_untrustworthy_numbers_are_marked_in_chromium(browser, tmp_path):
    """The doctored run of test_report_fidelity: wrong answers on top, unstable points titled, columns sortable."""
    from tests.test_report_fidelity import NOTE, doctored_run

    page = doctored_run(tmp_path) / "report.html"
    browser.open(page)
    assert browser.problems() == [], browser.problems()
    assert browser.evaluate("document.querySelector('#incorrect').getBoundingClientRect().top"
                            " < document.querySelector('#scaling').getBoundingClientRect().top")
    titles = browser.evaluate("Array.from(document.querySelectorAll('#scaling svg.chart g[id^=\"unstable-\"] > title'))"
                              ".map(t => t.textContent)")
    assert len(titles) == 4 and all(t.endswith(NOTE) for t in titles)
    col = _header_index(browser, "results-table", "stability")
    browser.click(f"#results-table thead th:nth-child({col + 1})")
    values = _column_values(browser, "results-table", col)
    marked = [v for v in values if v]  # stable, unstable; rows without a verdict (skipped …) go last
    assert marked == sorted(marked) and marked.count("unstable") == 2 and values[:len(marked)] == marked
    browser.screenshot(tmp_path / "doctored.png")
    assert browser.problems() == [], browser.problems()


def derive_run(src: Path, dst: Path, run_id: str, started: str, slow: dict[str, float]) -> Path:
    """A copy of a real run with another id and start time, some variants' times scaled by ``slow``."""
    import pandas as pd

    dst.mkdir(parents=True)
    meta = json.loads((src / "run.json").read_text())
    meta.update(run_id=run_id, started=started, finished=started)
    (dst / "run.json").write_text(json.dumps(meta))
    rows = pd.read_parquet(src / "results.parquet")
    samples = pd.read_parquet(src / "samples.parquet")
    factor = rows["variant"].map(slow).fillna(1.0)
    for col in ("time_ms", "time_ms_p10", "time_ms_p90"):
        rows[col] = rows[col] * factor
    rows["run_id"] = run_id
    samples["time_ms"] = samples["time_ms"] * samples["case_id"].map(dict(zip(rows["case_id"], factor))).fillna(1.0)
    rows.to_parquet(dst / "results.parquet", index=False)
    samples.to_parquet(dst / "samples.parquet", index=False)
    return dst


@pytest.fixture(scope="module")
def regression_pages(tmp_path_factory, tiny_run):
    """compare.html and trend.html from the regression commands, over runs derived from a real one."""
    import argparse

    import harness.cli.regression as cli

    src = tiny_run
    root = tmp_path_factory.mktemp("history")
    runs = [derive_run(src, root / "runs" / f"run{i}", f"20260101-00000{i}-tiny-report-derived{i}",
                       f"2026-01-01T00:00:0{i}+00:00", {"naive": 1.8} if i >= 3 else {}) for i in range(5)]
    parser = argparse.ArgumentParser(prog="bench")
    cli.register(parser.add_subparsers(dest="command"))
    pages = {}
    for name, argv in (("compare", ["compare", str(runs[2]), str(runs[4]), "--root", str(root)]),
                       ("trend", ["trend", "--root", str(root)])):
        out = root / f"{name}.html"
        args = parser.parse_args(argv + ["-o", str(out)])
        status = args.handler(args)
        assert out.exists(), f"bench {name} wrote no page (exit {status})"
        pages[name] = out
    return pages


@needs_chromium
@pytest.mark.parametrize("kind", ["compare", "trend"])
def test_regression_pages_in_chromium(browser, regression_pages, kind, tmp_path):
    page = regression_pages[kind]
    browser.open(page)
    assert browser.problems() == [], browser.problems()
    assert browser.requested_urls() == [page.resolve().as_uri()]
    charts = browser.evaluate("Array.from(document.querySelectorAll('svg.chart'))"
                              ".map(s => s.getBoundingClientRect().width)")
    assert charts and all(w > 300 for w in charts)
    tables = browser.evaluate("Array.from(document.querySelectorAll('table.sortable')).map(t => t.id || '')")
    assert tables
    # sort the first sortable table by each numeric-looking column header click and check the order
    table_sel = "table.sortable"
    n_cols = browser.evaluate(f"document.querySelector('{table_sel}').tHead.rows[0].cells.length")
    checked = 0
    for col in range(n_cols):
        browser.click(f"table.sortable thead th:nth-child({col + 1})")
        values = browser.evaluate(
            f"Array.from(document.querySelector('{table_sel}').tBodies[0].rows).map(r => {{ const c = r.cells[{col}];"
            " if (!c) return null; const s = c.getAttribute('data-sort'); if (s !== null) return s === '' ? null :"
            " (isNaN(Number(s)) ? s.toLowerCase() : Number(s)); const t = c.textContent.trim();"
            " const n = Number(t.replace(/,/g, '')); return t === '' ? null : (isNaN(n) ? t.toLowerCase() : n); })"
        )
        present = [v for v in values if v is not None]
        if len(present) >= 2 and all(isinstance(v, (int, float)) for v in present):
            assert present == sorted(present), (kind, col, present)
            checked += 1
    assert checked >= 1
    browser.screenshot(tmp_path / f"{kind}.png")
    assert browser.problems() == [], browser.problems()


@needs_chromium
def test_laptop_width_has_no_page_level_horizontal_scroll(browser, report_page, tmp_path):
    browser.resize(1280, 800)
    try:
        browser.open(report_page)
        overflow = browser.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0  # wide tables scroll inside their own box, not the page
        browser.screenshot(tmp_path / "report-1280.png", full_page=False)
    finally:
        browser.resize(1366, 900)


@needs_chromium
def test_broken_page_is_caught(browser, tmp_path):
    """The checks can fail: a page with a script error and a missing image is reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>undefinedFunction();</script>'
                    "<script>console.error('boom')</script></body></html>")
    browser.open(page)
    problems = browser.problems()
    assert any("undefinedFunction" in p for p in problems)
    assert any("boom" in p for p in problems)
    assert any("missing.png" in p for p in problems)
