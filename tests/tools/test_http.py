"""http.get: refusals by default and by rule, and real fetches from a local server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tools.errors import ToolError, ToolRegistrationError
from tools.http import HostRule, make_http_get, register_http_tools
from tools.registry import ToolRegistry

BIG = 4096


class Handler(BaseHTTPRequestHandler):
    """Routes of the local test server."""

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/hello": lambda: self._send(200, "héllo".encode(), "text/plain; charset=utf-8"),
            "/missing": lambda: self._send(404, b"not here", "text/plain"),
            "/big": lambda: self._send(200, b"x" * BIG, "text/plain"),
            "/big-chunked": self._chunked,
            "/same-host": lambda: self._redirect("/hello"),
            "/other-host": lambda: self._redirect(f"http://localhost:{port}/hello"),
            "/loop": lambda: self._redirect("/loop"),
            "/slow": self._slow,
        }
        routes.get(self.path, lambda: self._send(404, b"", "text/plain"))()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Secret", "not passed on")
        self.end_headers()
        self.wfile.write(body)

    def _chunked(self) -> None:
        # No Content-Length: the cap must hold while reading.
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"y" * BIG)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _slow(self) -> None:
        time.sleep(1.0)
        self._send(200, b"late", "text/plain")

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def test_default_refuses_every_host(server: str) -> None:
    registry = ToolRegistry()
    register_http_tools(registry)
    for url in (f"{server}/hello", "https://example.com/"):
        with pytest.raises(ToolError, match="host not allowed") as caught:
            await registry.call("http.get", {"url": url})
        assert "tools.http_allow_hosts" in str(caught.value)
        assert caught.value.tool == "http.get"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://127.0.0.1/x", "only http and https"),
        ("gopher://127.0.0.1/", "only http and https"),
        ("/relative/path", "only http and https"),
        ("http://", "no host"),
        ("http://example.com/", "host not allowed: example.com:80"),
        ("http://127.0.0.2/", "host not allowed"),
        ("http://localhost/", "host not allowed"),
        ("http://127.0.0.1.evil.com/", "host not allowed"),
    ],
)
async def test_refusals(url: str, message: str) -> None:
    get = make_http_get(["127.0.0.1"])
    with pytest.raises(ToolError, match=message):
        await get(url)


async def test_allowed_fetch(server: str) -> None:
    registry = ToolRegistry()
    register_http_tools(registry, allow_hosts=["127.0.0.1"])
    result = await registry.call("http.get", {"url": f"{server}/hello"})
    assert result["status"] == 200
    assert result["text"] == "héllo"
    assert result["url"] == f"{server}/hello"
    assert result["headers"]["content-type"] == "text/plain; charset=utf-8"
    assert "x-secret" not in result["headers"]
    missing = await registry.call("http.get", {"url": f"{server}/missing"})
    assert (missing["status"], missing["text"]) == (404, "not here")


async def test_port_rules(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    assert (await make_http_get([f"127.0.0.1:{port}"])(f"{server}/hello"))["status"] == 200
    with pytest.raises(ToolError, match="host not allowed"):
        await make_http_get([f"127.0.0.1:{port + 1}"])(f"{server}/hello")


async def test_redirects_stay_on_the_host(server: str) -> None:
    get = make_http_get(["127.0.0.1", "localhost"])
    followed = await get(f"{server}/same-host")
    assert (followed["status"], followed["url"]) == (200, f"{server}/hello")
    with pytest.raises(ToolError, match="redirect to another host refused: localhost"):
        await get(f"{server}/other-host")
    with pytest.raises(ToolError, match="more than 5 redirects"):
        await get(f"{server}/loop")


async def test_size_cap(server: str) -> None:
    get = make_http_get(["127.0.0.1"], max_bytes=BIG - 1)
    for path in ("/big", "/big-chunked"):
        with pytest.raises(ToolError, match=f"larger than {BIG - 1} bytes"):
            await get(f"{server}{path}")
    assert len((await make_http_get(["127.0.0.1"], max_bytes=BIG)(f"{server}/big"))["text"]) == BIG


async def test_timeout(server: str) -> None:
    get = make_http_get(["127.0.0.1"], timeout_s=0.2)
    with pytest.raises(ToolError, match="timed out"):
        await get(f"{server}/slow")


async def test_connection_failure() -> None:
    get = make_http_get(["127.0.0.1:1"])
    with pytest.raises(ToolError, match=r"request to 127\.0\.0\.1 failed"):
        await get("http://127.0.0.1:1/")


def test_host_rules() -> None:
    wildcard = HostRule.parse("*.example.com")
    assert wildcard == HostRule(host="example.com", subdomains=True)
    assert HostRule.parse("[::1]:8080") == HostRule(host="::1", port=8080)
    assert HostRule.parse("Example.COM") == HostRule(host="example.com")
    for bad in ("http://x/y", "a/b", "user@host", ""):
        with pytest.raises(ToolRegistrationError, match="invalid host entry"):
            HostRule.parse(bad)


async def test_wildcard_allows_subdomains_only() -> None:
    get = make_http_get(["*.example.com"])
    with pytest.raises(ToolError, match="host not allowed"):
        await get("http://example.com/")
    with pytest.raises(ToolError, match="host not allowed"):
        await get("http://badexample.com/")
