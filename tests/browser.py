"""Headless Chromium driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no
websocket library): one browser for many pages, each laid out at a chosen window width, then measured by a
script in the page (:data:`LAYOUT_JS`) or photographed. Used by ``tests/test_layout.py``; also a small command
for the book's screenshots::

    python tests/browser.py _build/html screens intro 05_results fusion=05_results:#when-does-fusion-help

Every host but the loopback goes to a closed proxy port, as in ``tests/test_render.py``: a page that needs the
network shows it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium")
SKIP_REASON = "Debian's chromium is not installed (.ci/run installs it when running as root: apt-get install chromium)"

#: The widths a reader's browser has: a laptop window and a phone held upright.
DESKTOP, PHONE = 1280, 390

#: Run in a laid-out page: every table, img, svg and figure of the main content column (the theme's
#: ``article.bd-article``; the body on a page without one) that reaches past the right edge of that column or of
#: the viewport, unless an ancestor inside the column scrolls horizontally (overflow-x auto or scroll) and itself
#: fits; a clipping ancestor (overflow-x hidden or clip) does not count as scrolling. Also a page that scrolls
#: sideways as a whole. Returns JSON: ``{"width", "column", "problems": [...], "scrolled": [...]}``, where
#: ``scrolled`` lists the containers in which a table scrolls sideways (allowed, but a table that could fit should).
LAYOUT_JS = r"""
(() => {
  const SLACK = 1;  // px of rounding
  const view = document.documentElement.clientWidth;
  const column = document.querySelector('article.bd-article') || document.body;
  const WIDE = '.tag_full-width, .full-width';  // sphinx-book-theme's full-width cells reach into the margin
  const limitOf = (el) => {
    const wide = el.closest(WIDE);
    const box = wide && column.contains(wide) ? wide : column;
    return Math.min(box.getBoundingClientRect().right, view);
  };
  const describe = (el) => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    const cls = (el.getAttribute('class') || '').trim().split(/\s+/).filter(Boolean).slice(0, 3);
    if (cls.length) s += '.' + cls.join('.');
    const section = el.closest('section[id]');
    return section ? `${s} in section #${section.id}` : s;
  };
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden';
  };
  const problems = [];
  for (const el of column.querySelectorAll('table, img, svg, figure')) {
    if (!visible(el)) continue;
    if (el.tagName.toLowerCase() === 'svg' && el.parentElement.closest('svg')) continue;
    const right = el.getBoundingClientRect().right, limit = limitOf(el);
    if (right <= limit + SLACK) continue;
    let scroller = null, clipper = null;
    for (let a = el.parentElement; a && a !== column.parentElement; a = a.parentElement) {
      const ox = getComputedStyle(a).overflowX;
      if (ox === 'auto' || ox === 'scroll') { scroller = a; break; }
      if ((ox === 'hidden' || ox === 'clip') && !clipper) clipper = a;
    }
    const what = `${describe(el)} (right edge ${Math.round(right)} px, column ends at ${Math.round(limit)} px)`;
    if (clipper && (!scroller || clipper.contains(scroller) === false)) {
      problems.push(`${what} is clipped by ${describe(clipper)} (overflow-x ${getComputedStyle(clipper).overflowX})`);
    } else if (!scroller) {
      problems.push(`${what} sticks out, in no horizontally scrolling container`);
    } else if (scroller.getBoundingClientRect().right > limit + SLACK) {
      problems.push(`${what} scrolls in ${describe(scroller)}, which itself sticks out to ` +
                    `${Math.round(scroller.getBoundingClientRect().right)} px`);
    }
  }
  // tables a reader has to scroll sideways to read whole (allowed: reported, not problems)
  const scrolled = [];
  for (const box of column.querySelectorAll('*')) {
    const ox = getComputedStyle(box).overflowX;
    if ((ox === 'auto' || ox === 'scroll') && box.querySelector('table') && visible(box) &&
        box.scrollWidth > box.clientWidth + SLACK) {
      scrolled.push(`${describe(box)} (${box.scrollWidth} px of content in ${box.clientWidth} px)`);
    }
  }
  const page = document.documentElement.scrollWidth;
  if (page > view + SLACK) problems.push(`the page scrolls sideways: ${page} px wide in a ${view} px window`);
  return JSON.stringify({width: view, column: Math.round(limitOf(column)), problems, scrolled});
})()
"""

#: Waits for what changes a page's layout after its load event: web fonts and MathJax's typesetting.
SETTLE_JS = r"""
(async () => {
  if (document.fonts) await document.fonts.ready;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  return true;
})()
"""


class Chromium:
    """One headless Chromium and one tab, spoken to over the DevTools protocol on a pipe (fds 3 and 4 of the
    child: it reads commands on 3 and writes replies and events on 4, each a JSON message ended by a NUL)."""

    def __init__(self, timeout: float = 60):
        if CHROMIUM is None:
            raise RuntimeError(SKIP_REASON)
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire():  # in the child, before exec: its fds 3 and 4 are the pipe's ends
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", "--proxy-server=http://127.0.0.1:9",
             "--no-first-run", "--no-default-browser-check", "--mute-audio", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    # -- the protocol
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium sent nothing in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            # an event: none is asked for (no domain is enabled), so it is dropped

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    # -- pages
    def open(self, url: str, width: int, height: int = 900) -> None:
        """``url`` laid out in a ``width`` px wide window (a phone's, honouring the page's viewport meta tag,
        below 600 px), once it has loaded, its fonts and its math."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + self.timeout
        while True:  # until the new document has loaded (events of about:blank may still be on their way)
            try:
                state = self.evaluate("[document.readyState, location.href]")
            except RuntimeError:  # the page navigated while the question was asked
                state = None
            if state and state[0] == "complete" and state[1].split("#")[0] == url.split("#")[0]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load (last state {state})")
            time.sleep(0.05)
        self.evaluate(SETTLE_JS)

    def layout_problems(self) -> dict:
        return json.loads(self.evaluate(LAYOUT_JS))

    def screenshot(self, path: Path, selector: str | None = None) -> None:
        """A PNG of the window as a reader sees it: at the page's top, or scrolled so that the element
        ``selector`` finds starts just below the theme's header bar."""
        if selector is not None:
            where = "document.querySelector(%s).getBoundingClientRect().top + scrollY - 72" % json.dumps(selector)
            self.evaluate(f"window.scrollTo(0, {where})")
            # the theme folds its page contents away over a full-width cell in a 0.4 s transition
            self.evaluate("new Promise((done) => setTimeout(done, 600))")
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """``folder`` over HTTP on the loopback, as GitHub Pages serves the site."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str]) -> None:
    """``SITE OUT SHOT...``, a shot being ``PAGE`` (its top) or ``NAME=PAGE:SELECTOR`` (scrolled to an element):
    each at both widths, as ``OUT/<PAGE or NAME>-<width>.png``."""
    site, out, shots = Path(argv[0]), Path(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    with serve(site) as base, Chromium() as browser:
        for shot in shots:
            name, _, where = shot.rpartition("=")
            page, _, selector = where.partition(":")
            for width in (DESKTOP, PHONE):
                browser.open(f"{base}/{page}.html", width)
                target = out / f"{name or page}-{width}.png"
                browser.screenshot(target, selector or None)
                print(target)


if __name__ == "__main__":
    main(sys.argv[1:])
