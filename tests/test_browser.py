"""Every page of the built book, opened in headless Chromium, renders offline.

One browser visits each HTML page (served over a local ``http.server``, so relative paths behave as
on a web server) and records what it finds; the tests below then check, page by page, that

* MathJax (the copy vendored in ``book/_static/mathjax``) loaded and typeset every formula,
* every image loaded,
* the browser console has no errors,
* nothing was fetched from outside the local server (every other host is unresolvable), and
* every internal link (``<a>``, ``<link>``, a redirect page's target) points to a file of the build
  and, with a ``#fragment``, to an id in that page.

Needs Debian's ``chromium`` and ``chromium-driver``: without them the tests are skipped, or fail
when ``GBML_REQUIRE_BROWSER=1`` (as in CI).
"""

import functools
import http.server
import os
import re
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = (
    "the browser test needs Chromium and its driver at /usr/bin/chromium and /usr/bin/chromedriver "
    "and the Python package selenium: `sudo apt-get install chromium chromium-driver` (Debian, Ubuntu) "
    "and `.venv/bin/python -m pip install -e '.[test]'`"
)
PAGE_LOAD_TIMEOUT_S = 60
SCRIPT_TIMEOUT_S = 30
# A page that only forwards the reader (Jupyter Book writes index.html so).
REDIRECT = re.compile(r'<meta http-equiv="refresh" content="0; url=(?P<url>[^"]+)"', re.IGNORECASE)

# Waits for MathJax's startup (which typesets the page) and then for the page's fonts.
WAIT_FOR_MATHJAX_AND_FONTS = """
const done = arguments[arguments.length - 1];
const fontsReady = () => document.fonts.ready.then(() => null);
const mj = window.MathJax;
if (!mj || !mj.startup || !mj.startup.promise) {
  fontsReady().then(() => done({loaded: false, error: null}));
} else {
  mj.startup.promise
    .then(() => null, (err) => String(err))
    .then((error) => fontsReady().then(() => done({loaded: true, error})));
}
"""

INSPECT_PAGE = """
return {
  mathElements: document.querySelectorAll(".math").length,
  untypesetMath: Array.from(document.querySelectorAll(".math"))
    .filter((el) => !el.querySelector("mjx-container"))
    .map((el) => el.textContent.trim().slice(0, 80)),
  mjxContainers: document.querySelectorAll("mjx-container").length,
  mathErrors: Array.from(document.querySelectorAll("mjx-merror"))
    .map((el) => (el.getAttribute("data-mjx-error") || el.textContent).slice(0, 200)),
  brokenImages: Array.from(document.images)
    .filter((img) => !(img.complete && img.naturalWidth > 0))
    .map((img) => img.getAttribute("src")),
  failedFonts: Array.from(document.fonts)
    .filter((font) => font.status === "error")
    .map((font) => font.family),
  links: Array.from(document.querySelectorAll("a[href], link[href]")).map((a) => a.href),
  resources: performance.getEntriesByType("resource").map((entry) => entry.name),
};
"""


@dataclass
class PageVisit:
    """What the browser found on one page."""

    mathjax_loaded: bool = False
    mathjax_error: str | None = None
    math_elements: int = 0
    untypeset_math: list[str] = field(default_factory=list)
    mjx_containers: int = 0
    math_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    failed_fonts: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    resources: list[str] = field(default_factory=list)


def _browser_unavailable() -> str | None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium")
    return f"missing {', '.join(missing)}" if missing else None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # requests for missing files surface as console errors
        pass


@pytest.fixture(scope="module")
def served_book(request):
    """The built book on http://127.0.0.1:<port>/: yields (base URL, folder of the HTML)."""
    unavailable = _browser_unavailable()
    if unavailable:
        message = f"{unavailable}; {INSTALL_HINT}"
        if os.environ.get("GBML_REQUIRE_BROWSER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    html = request.getfixturevalue("built_book")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", html
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often give /dev/shm only 64 MB
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1024",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # Offline: no host but the local server resolves, so a page that needs the network fails
        # loudly (console errors) on every machine, also on one that is online.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium never runs Selenium Manager (no driver download).
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    driver.set_script_timeout(SCRIPT_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _book_pages(html: Path) -> list[str]:
    """Every HTML page, relative to the build; _static's *.html are theme template fragments."""
    pages = [path.relative_to(html).as_posix() for path in html.rglob("*.html")]
    return sorted(page for page in pages if not page.split("/")[0].startswith("_"))


@pytest.fixture(scope="module")
def visits(served_book, chromium) -> dict[str, PageVisit]:
    """Every page opened once in the browser: {page path relative to the build: what it found}."""
    from selenium.common.exceptions import TimeoutException

    base, html = served_book
    chromium.get_log("browser")  # start from an empty log
    found = {}
    for page in _book_pages(html):
        redirect = REDIRECT.search((html / page).read_text(encoding="utf-8"))
        if redirect:  # index.html: its target is a page of its own; only check that it exists
            found[page] = PageVisit(links=[urljoin(base + page, redirect["url"])])
            continue
        chromium.get(base + page)  # returns after the load event: images and deferred scripts ran
        visit = PageVisit()
        try:
            state = chromium.execute_async_script(WAIT_FOR_MATHJAX_AND_FONTS)
        except TimeoutException:
            state = {"loaded": True, "error": f"not done after {SCRIPT_TIMEOUT_S} s"}
        visit.mathjax_loaded = state["loaded"]
        visit.mathjax_error = state["error"]
        seen = chromium.execute_script(INSPECT_PAGE)
        visit.math_elements = seen["mathElements"]
        visit.untypeset_math = seen["untypesetMath"]
        visit.mjx_containers = seen["mjxContainers"]
        visit.math_errors = seen["mathErrors"]
        visit.broken_images = seen["brokenImages"]
        visit.failed_fonts = seen["failedFonts"]
        visit.links = seen["links"]
        visit.resources = seen["resources"]
        visit.console_errors = [
            entry["message"] for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"
        ]
        found[page] = visit
    return found


def _report(problems: dict[str, list[str]]) -> str:
    lines = []
    for page, page_problems in problems.items():
        lines.append(f"{page}:")
        lines.extend(f"    {problem}" for problem in page_problems)
    return "\n".join(lines)


def _check(visits: dict[str, PageVisit], check) -> None:
    problems = {page: found for page, visit in visits.items() if (found := check(visit))}
    assert not problems, "\n" + _report(problems)


def test_every_page_was_visited(visits):
    assert "book/intro.html" in visits and "index.html" in visits, sorted(visits)
    assert sum(visit.math_elements > 0 for visit in visits.values()) >= 5, "hardly any math found"


def test_math_is_typeset(visits):
    def check(visit: PageVisit) -> list[str]:
        if visit.math_elements == 0:
            return []
        if not visit.mathjax_loaded:
            return [
                f"{visit.math_elements} math element(s) but MathJax did not load (no window.MathJax.startup)"
            ]
        problems = []
        if visit.mathjax_error:
            problems.append(f"MathJax startup failed: {visit.mathjax_error}")
        if visit.mjx_containers == 0:
            problems.append("no <mjx-container>: MathJax typeset nothing")
        problems += [f"not typeset: {text!r}" for text in visit.untypeset_math]
        problems += [f"MathJax error (<mjx-merror>): {error}" for error in visit.math_errors]
        problems += [f"font failed to load: {family}" for family in visit.failed_fonts]
        return problems

    _check(visits, check)


def test_every_image_loads(visits):
    _check(visits, lambda visit: [f"image did not load: {src}" for src in visit.broken_images])


# Console errors that are not the book's and do no harm, each matched by its exact text. Every other
# error fails the test: failed loads (a missing script, image or font, a blocked external host) and
# uncaught JavaScript exceptions alike.
HARMLESS_CONSOLE_ERRORS = (
    # Chromium asks the server root for /favicon.ico by itself when a page names no icon; the book
    # names none, and the request is not one of its pages' resources.
    "/favicon.ico - Failed to load resource: the server responded with a status of 404",
    # Sphinx 7 (which Jupyter Book 1 requires) writes sphinx-thebe's inline
    # `const THEBE_JS_URL = ...` script twice (sphinx-doc/sphinx#13402, fixed in Sphinx 8); the
    # second copy throws, the first has already set the same values. Thebe is only used on click.
    "Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared",
    # pydata-sphinx-theme's head script sets the colour mode to "" when localStorage holds none (a
    # reader's first visit, or this fresh profile); the theme then logs this and uses "auto", its
    # default, which is what the book wants.
    '"Got invalid theme mode: . Resetting to auto."',
)


def test_no_console_errors(visits):
    def check(visit: PageVisit) -> list[str]:
        return [
            f"console error: {message}"
            for message in visit.console_errors
            if not any(harmless in message for harmless in HARMLESS_CONSOLE_ERRORS)
        ]

    _check(visits, check)


def test_nothing_is_fetched_from_other_hosts(served_book, visits):
    base, _ = served_book

    def check(visit: PageVisit) -> list[str]:
        return [f"fetched from outside: {url}" for url in visit.resources if not url.startswith(base)]

    _check(visits, check)


class _Ids(HTMLParser):
    """The ids (and <a name=...> anchors) of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value and (name == "id" or (tag == "a" and name == "name")):
                self.ids.add(value)


def test_internal_links_resolve(served_book, visits):
    base, html = served_book

    @functools.cache
    def ids_of(target: Path) -> frozenset[str]:
        parser = _Ids()
        parser.feed(target.read_text(encoding="utf-8"))
        return frozenset(parser.ids)

    def check(visit: PageVisit) -> list[str]:
        problems = []
        for url in dict.fromkeys(visit.links):  # in page order, each once
            if not url.startswith(base):
                continue  # external links (papers, code) are not checked: the test runs offline
            address, fragment = urldefrag(url)
            path = unquote(urlsplit(address).path)
            target = html / path.lstrip("/")
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"broken link: {url[len(base) :]} (no {target.relative_to(html)})")
            elif fragment and target.suffix == ".html" and unquote(fragment) not in ids_of(target):
                problems.append(f"broken link: {url[len(base) :]} (no id {fragment!r} in that page)")
        return problems

    _check(visits, check)
