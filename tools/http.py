"""`http.get`: fetch a URL from an operator-approved host, with limits.

Specs come from the network, so the tool refuses everything by default: only hosts on the
server config's allow-list (`tools.http_allow_hosts`) can be fetched, only over http/https,
redirects are followed only within the same host, and the body is capped (1 MiB by default).
Allow-list entries are host names or IP addresses, optionally with a port (`example.com:8443`),
or `*.example.com` for the subdomains of a domain.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx
import msgspec

from tools.errors import ToolError, ToolRegistrationError
from tools.registry import ToolRegistry

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 1 << 20
MAX_REDIRECTS = 5
SCHEMES = ("http", "https")
KEPT_HEADERS = ("content-type", "content-length", "content-language", "last-modified", "etag")


class HostRule(msgspec.Struct, frozen=True):
    """One allow-list entry: a host (or a domain's subdomains) and optionally a port."""

    host: str
    port: int | None = None
    subdomains: bool = False

    @classmethod
    def parse(cls, entry: str) -> HostRule:
        """Parse `host`, `host:port`, `[::1]:8080` or `*.domain`; ToolRegistrationError if bad."""
        subdomains = entry.startswith("*.")
        try:
            url = httpx.URL(f"http://{entry.removeprefix('*.')}")
        except (httpx.InvalidURL, TypeError) as e:
            raise ToolRegistrationError(f"http allow-list: invalid host entry {entry!r}") from e
        if not url.host or url.path not in ("", "/") or url.userinfo:
            raise ToolRegistrationError(f"http allow-list: invalid host entry {entry!r}")
        return cls(host=url.host.lower(), port=url.port, subdomains=subdomains)

    def allows(self, url: httpx.URL) -> bool:
        """Whether this entry admits the URL's host and port."""
        host = url.host.lower()
        host_ok = host.endswith(f".{self.host}") if self.subdomains else host == self.host
        return host_ok and (self.port is None or self.port == _port(url))


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def make_http_get(
    allow_hosts: Iterable[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """The `http.get` tool function for this allow-list and these limits."""
    rules = tuple(HostRule.parse(entry) for entry in allow_hosts)

    async def get(url: str) -> dict[str, Any]:
        """Fetch a web page or API over HTTP(S) with GET; only server-approved hosts.

        Returns {"status", "url", "headers", "text"}; non-2xx statuses are returned, not raised.

        Args:
            url: an absolute http:// or https:// URL on an allow-listed host.
        """
        target = check_url(url, rules)
        async with httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            return await _follow(client, target, max_bytes=max_bytes, rules=rules)

    return get


def register_http_tools(
    registry: ToolRegistry,
    *,
    allow_hosts: Iterable[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> None:
    """Register `http.get`; with an empty allow-list it is present but refuses every URL."""
    get = make_http_get(allow_hosts, timeout_s=timeout_s, max_bytes=max_bytes)
    # The registry's limit is a backstop; the client's own timeout gives the clearer error.
    registry.register("http.get", get, timeout_s=timeout_s * (MAX_REDIRECTS + 1) + 1)


def check_url(url: str, rules: tuple[HostRule, ...]) -> httpx.URL:
    """Parse `url` and check scheme and host against the allow-list; ToolError if refused."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise ToolError(f"invalid URL {url!r}: {e}") from e
    if parsed.scheme not in SCHEMES:
        raise ToolError(f"only http and https URLs are allowed, not {parsed.scheme or 'none'!r}")
    if not parsed.host:
        raise ToolError(f"the URL {url!r} has no host")
    if not rules:
        raise ToolError(
            f"host not allowed: {parsed.host} (no hosts are allowed; the server operator lists "
            "them in tools.http_allow_hosts)"
        )
    if not any(rule.allows(parsed) for rule in rules):
        raise ToolError(f"host not allowed: {parsed.host}:{_port(parsed)}")
    return parsed


async def _follow(
    client: httpx.AsyncClient, target: httpx.URL, *, max_bytes: int, rules: tuple[HostRule, ...]
) -> dict[str, Any]:
    origin = target.host.lower()
    for _ in range(MAX_REDIRECTS + 1):
        result, location = await _fetch(client, target, max_bytes=max_bytes)
        if location is None:
            return result
        following = target.join(location)
        if following.host.lower() != origin:
            raise ToolError(f"redirect to another host refused: {following.host}")
        target = check_url(str(following), rules)
    raise ToolError(f"more than {MAX_REDIRECTS} redirects")


async def _fetch(
    client: httpx.AsyncClient, url: httpx.URL, *, max_bytes: int
) -> tuple[dict[str, Any], str | None]:
    try:
        async with client.stream("GET", url) as response:
            if response.is_redirect:
                return {}, response.headers["location"]
            body = await _read_capped(response, max_bytes)
            return _result(response, body), None
    except httpx.TimeoutException as e:
        raise ToolError(f"request to {url.host} timed out") from e
    except httpx.HTTPError as e:
        raise ToolError(f"request to {url.host} failed: {type(e).__name__}: {e}") from e


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ToolError(f"the response is larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ToolError(f"the response is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _result(response: httpx.Response, body: bytes) -> dict[str, Any]:
    try:
        text = body.decode(response.encoding or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = body.decode("utf-8", errors="replace")
    headers = {k: response.headers[k] for k in KEPT_HEADERS if k in response.headers}
    return {
        "status": response.status_code,
        "url": str(response.url),
        "headers": headers,
        "text": text,
    }
