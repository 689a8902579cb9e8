"""The dashboard (SPEC §11): GET / for a browser, its stream tickets, and the page in a real headless Chromium.

The browser tests drive Debian's ``chromium`` through ``chromedriver`` with
Selenium, against ``python fabrica.py serve examples/rack_reconciliation.py``
on port 0. They skip, saying why, only when Selenium, Chromium or its driver
is missing or cannot start (``.ci/run`` installs them). Screenshots go to
``$FABRICA_ARTIFACTS`` when it is set, else to the test's tmp dir.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fabrica

ROOT = Path(__file__).resolve().parent
WAIT = 20.0
TOKEN = "s3cret-dashboard-token"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def wait_until(predicate, timeout: float = WAIT, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (the last value)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        pause.wait(interval)


def request(app, method: str, path: str, headers=None, chunks: int | None = None):
    """One in-process request through ``app.wsgi``: (status, headers, body bytes).

    ``chunks=n`` reads only the first n chunks of the body (an endless stream) and closes it.
    """
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "80", "HTTP_HOST": "127.0.0.1", "wsgi.input": io.BytesIO(b""), "CONTENT_LENGTH": "0",
               "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(), "SERVER_PROTOCOL": "HTTP/1.1"}
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    got = {}

    def start_response(status, response_headers, exc_info=None):
        got["status"], got["headers"] = int(status.split()[0]), dict(response_headers)
    body = app.wsgi(environ, start_response)
    try:
        it = iter(body)
        data = b"".join(it) if chunks is None else b"".join(next(it) for _ in range(chunks))
    finally:
        getattr(body, "close", lambda: None)()
    return got["status"], got["headers"], data


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


###############################################################################
# Stream tickets ##############################################################
###############################################################################

class TestStreamTickets:
    def test_a_ticket_is_redeemed_once(self):
        tickets = fabrica.StreamTickets(clock=FakeClock())
        issued = tickets.issue()
        assert set(issued) == {"ticket", "expiresAt"} and issued["expiresAt"].endswith("Z")
        tickets.redeem(issued["ticket"])
        with pytest.raises(fabrica.UnauthorizedError, match="used already"):
            tickets.redeem(issued["ticket"])

    def test_an_expired_ticket_is_refused(self):
        clock = FakeClock()
        tickets = fabrica.StreamTickets(ttl=30, clock=clock)
        ticket = tickets.issue()["ticket"]
        clock.now += 31
        with pytest.raises(fabrica.UnauthorizedError, match="expired"):
            tickets.redeem(ticket)

    @pytest.mark.parametrize("mangle", [
        lambda t: "", lambda t: "not-a-ticket", lambda t: t + "x", lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: str(int(t.split(".")[0]) + 3600) + t[t.index("."):],      # a later expiry, same mac
        lambda t: t.replace(".", "\n", 1), lambda t: "\u0661" + t])
    def test_a_forged_or_malformed_ticket_is_refused(self, mangle):
        tickets = fabrica.StreamTickets(clock=FakeClock())
        with pytest.raises(fabrica.UnauthorizedError, match="invalid stream ticket"):
            tickets.redeem(mangle(tickets.issue()["ticket"]))

    def test_another_servers_ticket_is_refused(self):
        clock = FakeClock()
        with pytest.raises(fabrica.UnauthorizedError, match="invalid"):
            fabrica.StreamTickets(clock=clock).redeem(fabrica.StreamTickets(clock=clock).issue()["ticket"])

    def test_the_redeemed_set_is_bounded(self):
        clock = FakeClock()
        tickets = fabrica.StreamTickets(ttl=30, clock=clock, capacity=3)
        for _ in range(3):
            tickets.redeem(tickets.issue()["ticket"])
        with pytest.raises(fabrica.FabricaError, match="retry shortly") as refused:
            tickets.redeem(tickets.issue()["ticket"])
        assert refused.value.status == 429
        clock.now += 31         # the three have expired: forgotten, so there is room again
        tickets.redeem(tickets.issue()["ticket"])
        assert len(tickets._used) == 1


###############################################################################
# GET / and GET /events with --token ##########################################
###############################################################################

@pytest.fixture
def token_app(tmp_path):
    app = fabrica.Fabrica(data_dir=str(tmp_path / "data"), durable=False, token=TOKEN)
    app.register("Widget")
    app.rest.keepalive = 0.05
    app.rest.tickets.clock = FakeClock()
    with app:
        yield app


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def ticket_of(app) -> str:
    status, headers, body = request(app, "POST", "/events/ticket", BEARER)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    return json.loads(body)["ticket"]


class TestTokenAndStream:
    def test_the_page_needs_no_token_and_the_data_does(self, token_app):
        status, headers, body = request(token_app, "GET", "/", {"Accept": BROWSER_ACCEPT})
        assert status == 200 and body == fabrica.DASHBOARD_HTML.encode()
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        for path in ("/", "/apis", "/widgets", "/metrics", "/events"):
            assert request(token_app, "GET", path)[0] == 401, path
        assert request(token_app, "POST", "/events/ticket")[0] == 401

    def test_a_ticket_opens_the_stream_once(self, token_app):
        ticket = ticket_of(token_app)
        status, headers, first = request(token_app, "GET", f"/events?ticket={ticket}", chunks=1)
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream") and first.startswith(b":")
        status, _, body = request(token_app, "GET", f"/events?ticket={ticket}")
        assert status == 401 and "used already" in json.loads(body)["error"]

    @pytest.mark.parametrize("query", ["", "?ticket=", "?ticket=123.abc.def", "?since=0"])
    def test_the_stream_refuses_no_ticket_or_a_bad_one(self, token_app, query):
        status, headers, body = request(token_app, "GET", "/events" + query)
        assert status == 401 and json.loads(body)["code"] == 401

    def test_the_stream_refuses_an_expired_ticket(self, token_app):
        ticket = ticket_of(token_app)
        token_app.rest.tickets.clock.now += fabrica.STREAM_TICKET_TTL
        status, _, body = request(token_app, "GET", f"/events?ticket={ticket}")
        assert status == 401 and "expired" in json.loads(body)["error"]

    def test_a_ticket_opens_nothing_but_the_stream(self, token_app):
        ticket = ticket_of(token_app)
        for method, path in (("GET", "/apis"), ("GET", "/widgets"), ("POST", "/events/ticket"), ("GET", "/")):
            assert request(token_app, method, f"{path}?ticket={ticket}")[0] == 401, path
        assert request(token_app, "GET", f"/events?ticket={ticket}", chunks=1)[0] == 200   # still unspent

    def test_untyped_frames_reach_an_eventsource_onmessage(self, token_app):
        token_app.client.create("Widget", name="w1")
        since = "0"
        typed = request(token_app, "GET", f"/events?since={since}", BEARER, chunks=2)[2].decode()
        untyped = request(token_app, "GET", f"/events?since={since}&untyped=true", BEARER, chunks=2)[2].decode()
        assert "\nevent: io.fabrica.widget.created\n" in typed
        frame = untyped.split("\n\n")[1]
        assert [line.split(":", 1)[0] for line in frame.split("\n")] == ["id", "data"]
        assert json.loads(frame.split("data: ", 1)[1])["type"] == "io.fabrica.widget.created"

    def test_the_openapi_document_names_the_ticket(self, token_app):
        doc = json.loads(request(token_app, "GET", "/openapi.json", BEARER)[2])
        assert "post" in doc["paths"]["/events/ticket"]
        names = {p["$ref"].rsplit("/", 1)[1] for p in doc["paths"]["/events"]["get"]["parameters"]}
        assert {"StreamTicket", "Untyped"} <= names


class TestPage:
    def test_the_page_is_offline_and_in_budget(self):
        html = fabrica.DASHBOARD_HTML
        assert html.startswith("<!doctype html>") and "new EventSource(" in html
        assert not re.search(r"https?://", html), "nothing is fetched from another host"
        assert not re.search(r"<script[^>]*\bsrc\s*=|@import|url\(", html, re.I), "scripts and styles are inline"
        urls = re.findall(r"""<\w[^>]*\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html)
        assert urls and all(url.startswith("data:") for url in urls), urls
        assert "innerHTML" not in html, "text from the server goes in with textContent only"
        assert len(html.encode()) < 24 * 1024


###############################################################################
# In a real browser ###########################################################
###############################################################################

def _chromium_paths() -> tuple[str, str]:
    browser = os.environ.get("FABRICA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("FABRICA_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium through chromedriver; skips (with the reason) when either is missing or cannot start."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install '.[test]')")
    binary, driver_path = _chromium_paths()
    for path, package in ((binary, "chromium"), (driver_path, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"{path} is missing: apt-get install -y {package} (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1440,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # performance: requests
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"chromium could not start: {str(exc).strip().splitlines()[0]}")
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


class Serve:
    """``python fabrica.py serve examples/rack_reconciliation.py`` on port 0, the port read from its log."""

    def __init__(self, data_dir: Path, *args: str):
        cmd = [sys.executable, str(ROOT / "fabrica.py"), "serve", str(ROOT / "examples" / "rack_reconciliation.py"),
               "--data-dir", str(data_dir), "--port", "0", "--no-fsync", *args]
        self.proc = subprocess.Popen(cmd, cwd=str(data_dir.parent), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        self.lines: list[str] = []
        self.port = None
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    found.set()
            found.set()
        threading.Thread(target=pump, daemon=True).start()
        found.wait(WAIT)
        if self.port is None:
            self.stop()
            pytest.fail("serve did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Content-Type": "application/json"}
        self._local = threading.local()

    def call(self, method: str, path: str, body=None):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        conn.request(method, path, None if body is None else json.dumps(body), self.headers)
        res = conn.getresponse()
        data = res.read()
        return res.status, res.headers, json.loads(data) if data else None

    def create(self, plural: str, spec: dict):
        status, _, body = self.call("POST", f"/{plural}", spec)
        assert status == 201, body
        return body

    def counts(self) -> dict[str, int]:
        kinds = self.call("GET", "/apis")[2]["kinds"]
        return {k["kind"]: int(self.call("GET", f"/{k['plural']}?limit=1")[1]["X-Total-Count"]) for k in kinds}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def rack_server(tmp_path_factory):
    server = Serve(tmp_path_factory.mktemp("dashboard") / "data")
    yield server
    server.stop()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where screenshots go: $FABRICA_ARTIFACTS, else the test's tmp dir."""
    folder = Path(os.environ.get("FABRICA_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def page(driver, js: str, *args):
    return driver.execute_script(js, *args)


def shown_counts(driver) -> dict[str, int]:
    return page(driver, """const out = {};
        for (const e of document.querySelectorAll('#kinds .kind'))
          out[e.children[0].textContent] = +e.children[2].textContent.replace(/[^0-9]/g, '');
        return out;""")


def table_rows(driver) -> list[list[str]]:
    return page(driver, """return [...document.querySelectorAll('#table .row')].filter((e) => !e.hidden)
        .map((e) => [...e.children].map((c) => c.textContent));""")


def severe_logs(driver, allow: str | None = None) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and not (allow and allow in e["message"])]


def click_row(driver, name: str) -> None:
    assert page(driver, """for (const e of document.querySelectorAll('#table .row'))
        if (!e.hidden && e.children[0].textContent === arguments[0]) { e.click(); return true; }
        return false;""", name), f"no row {name!r}: {table_rows(driver)}"


def open_page(driver, url: str, fragment: str = "") -> None:
    driver.get("about:blank")       # a new document, even when only the fragment differs
    driver.get(url + "/" + fragment)
    page(driver, "window.loadedOnce = true;")     # gone if the page ever reloads
    assert wait_until(lambda: page(driver, "return document.getElementById('live').textContent") == "live"), \
        page(driver, "return document.body.innerText")


def template(name: str, chassis: int, blades: int = 2, nodes: int = 1) -> dict:
    return {"name": name, "chassisCount": chassis,
            "chassisConfig": {"bladeCount": blades, "bladeConfig": {"nodeCount": nodes, "bmcMode": "shared"}}}


class TestInABrowser:
    def test_a_rack_appears_turns_ready_and_shows_its_chassis(self, browser, rack_server, artifacts):
        open_page(browser, rack_server.url, "#Rack")
        rack_server.create("racktemplates", template("standard", chassis=2))
        rack_server.create("racks", {"name": "rack-01", "templateUID": "standard"})
        assert wait_until(lambda: any(r[0] == "rack-01" and r[1].startswith("Ready") for r in table_rows(browser))), \
            table_rows(browser)
        row = next(r for r in table_rows(browser) if r[0] == "rack-01")
        assert row[2] == "1 / 1" and re.fullmatch(r"\d+s", row[3]), row
        click_row(browser, "rack-01")
        detail = lambda: page(browser, "return document.getElementById('detail').innerText")  # noqa: E731
        assert wait_until(lambda: "Chassis rack-01-c0" in detail() and "Chassis rack-01-c1" in detail()), detail()
        assert '"totalChassis": 2' in detail()
        page(browser, """for (const a of document.querySelectorAll('#detail a'))
            if (a.textContent === 'Chassis rack-01-c1') a.click();""")     # a dependent: its owner links back
        assert wait_until(lambda: "owner: Rack rack-01" in detail()), detail()
        assert wait_until(lambda: shown_counts(browser) == rack_server.counts()), shown_counts(browser)
        assert page(browser, "return window.loadedOnce") is True, "the page reloaded"
        assert severe_logs(browser) == []
        browser.save_screenshot(str(artifacts / "dashboard-rack.png"))

    def test_a_burst_of_2000_leaves_the_page_responsive_and_right(self, browser, rack_server, artifacts):
        open_page(browser, rack_server.url, "#RackTemplate")
        page(browser, """window.worstGap = 0; let last = performance.now();
            window.probe = setInterval(() => { const now = performance.now();
              window.worstGap = Math.max(window.worstGap, now - last); last = now; }, 50);""")
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: rack_server.create("racktemplates", template(f"burst-{n:04d}", 1)), range(2000)))
        rack_server.create("racks", {"name": "rack-02", "templateUID": "burst-0007"})
        assert wait_until(lambda: shown_counts(browser) == rack_server.counts(), timeout=60), \
            (shown_counts(browser), rack_server.counts())
        caught_up = time.monotonic() - started
        worst = page(browser, "clearInterval(window.probe); return window.worstGap")
        click_row(browser, "burst-0000")
        assert wait_until(lambda: "RackTemplate burst-0000" in page(browser, "return document.getElementById('detail')"
                                                                             ".innerText"), timeout=5)
        page(browser, "document.getElementById('types').value = 'io.**.created';"
                      "document.getElementById('types').dispatchEvent(new Event('input'))")
        assert wait_until(lambda: page(browser, """const t = [...document.querySelectorAll('#log > div > div')]
            .filter((e) => !e.hidden).map((e) => e.children[1].textContent);
            return t.length > 5 && t.every((x) => x.endsWith('.created'));"""))
        print(f"\n2,000 creates: the page showed the right counts {caught_up:.1f} s after the burst began; "
              f"longest gap between 50 ms timer ticks {worst:.0f} ms")
        assert worst < 5000, f"the page froze for {worst:.0f} ms"
        assert severe_logs(browser) == []
        page(browser, "[...document.querySelectorAll('#kinds .kind')].find((e) => e.firstChild.textContent === "
                      "'Rack').click()")
        assert wait_until(lambda: any(r[0] == "rack-02" for r in table_rows(browser)))
        click_row(browser, "rack-02")
        assert wait_until(lambda: "dependents: Chassis" in page(browser, "return document.body.innerText"))
        browser.save_screenshot(str(artifacts / "dashboard.png"))
        assert (artifacts / "dashboard.png").stat().st_size > 10000

    def test_a_dropped_stream_resumes_and_a_lost_position_relists(self, browser, rack_server):
        open_page(browser, rack_server.url, "#RackTemplate")
        live = lambda: page(browser, "return document.getElementById('live').textContent") == "live"  # noqa: E731
        names = lambda: {r[0] for r in table_rows(browser)}     # noqa: E731
        page(browser, "document.getElementById('filter').value = 'after-';"
                      "document.getElementById('filter').dispatchEvent(new Event('input'))")
        rack_server.create("racktemplates", template("after-open", 1))
        assert wait_until(lambda: "after-open" in names()), names()
        listed = page(browser, "return epoch")
        page(browser, "es.onerror()")         # as when the server ends the stream: a new ticket, ?since=
        assert wait_until(live)
        rack_server.create("racktemplates", template("after-resume", 1))
        assert wait_until(lambda: "after-resume" in names()), names()
        assert page(browser, "return epoch") == listed, "resumed from the last event, not listed again"
        page(browser, "lastId = '999999999'; es.onerror()")   # a position the server never had: 410, relist
        assert wait_until(lambda: page(browser, "return epoch") == listed + 1 and live())
        rack_server.create("racktemplates", template("after-relist", 1))
        assert wait_until(lambda: {"after-open", "after-resume", "after-relist"} <= names()), names()
        assert wait_until(lambda: shown_counts(browser) == rack_server.counts()), shown_counts(browser)
        assert page(browser, "return window.loadedOnce") is True
        assert severe_logs(browser, allow="/events?") == []     # the 410 is the one expected failure

    def test_with_a_token_the_page_asks_and_the_stream_uses_a_ticket(self, browser, tmp_path):
        server = Serve(tmp_path / "data", "--token", TOKEN, "--log-level", "debug")
        try:
            server.headers["Authorization"] = f"Bearer {TOKEN}"
            browser.get("about:blank")
            browser.get_log("performance")      # only this test's requests from here on
            browser.get(server.url + "/#RackTemplate")
            assert wait_until(lambda: page(browser, "return document.getElementById('auth').open"))
            page(browser, "document.getElementById('token').value = arguments[0];"
                          "document.querySelector('#auth button').click()", TOKEN)
            assert wait_until(lambda: page(browser, "return document.getElementById('live').textContent") == "live")
            server.create("racktemplates", template("tokened", 1))
            assert wait_until(lambda: any(r[0] == "tokened" for r in table_rows(browser))), table_rows(browser)
            assert severe_logs(browser, allow=" 401 ") == []
            urls = [m["params"]["request"]["url"] for m in (json.loads(e["message"])["message"]
                                                            for e in browser.get_log("performance"))
                    if m["method"] == "Network.requestWillBeSent"]
            assert any("/events?ticket=" in url for url in urls), urls
            assert not any(TOKEN in url for url in urls), "the stream's URL carries a ticket, never the token"
            assert TOKEN not in "".join(server.lines)
        finally:
            page(browser, "sessionStorage.clear()")
            server.stop()
