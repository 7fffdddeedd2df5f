"""HTTP client for OpenAI-compatible endpoints: raw aiohttp + orjson, retries, error classes.

Measured on the 2-core dev machine against a loopback stub (issue 3): the openai SDK spends ~4 ms
of client CPU per request, raw aiohttp + orjson ~0.2 ms, so the engine talks HTTP itself. Retry
decisions are a small value type (inspect_ai's shape): retryable faults back off exponentially with
full jitter and honour Retry-After; fatal faults (bad key, unknown model, context too long, an
unsupported request field) stop the run with a message instead of burning it.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson


class FatalError(RuntimeError):
    """Stops the whole run (every further request would fail the same way)."""


class RetryableError(RuntimeError):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = random.uniform(0, min(self.cap, self.base * 2 ** attempt))  # full jitter
        if retry_after is not None:
            return min(max(retry_after, backoff), self.cap * 5)
        return backoff


def redact_url(url: str) -> str:
    """Drop credentials from a URL (user:pass@host) before it reaches a log or manifest."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


def normalize_base(url: str) -> str:
    """Accept http://host:port, .../v1 or .../v1/ and return the .../v1 base."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        u = u[: -len("/chat/completions")]
    if not u.endswith("/v1"):
        u += "/v1"
    return u


def _retry_after(headers) -> float | None:
    v = headers.get("Retry-After") or headers.get("retry-after")
    if not v:
        ms = headers.get("retry-after-ms")
        return float(ms) / 1000 if ms else None
    try:
        return max(0.0, float(v))
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(v)
            return max(0.0, dt.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _error_message(body: bytes) -> str:
    try:
        d = orjson.loads(body)
        err = d.get("error", d) if isinstance(d, dict) else d
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or d)[:300]
    except Exception:
        return body[:300].decode("utf-8", "replace")


def classify(status: int, body: bytes, headers) -> Exception:
    """Map an HTTP error response to a FatalError or RetryableError."""
    msg = _error_message(body)
    low = msg.lower()
    if status in (401, 403):
        return FatalError(f"HTTP {status}: authentication failed ({msg}). Check the API key variable (--api-key-env).")
    if status == 404:
        return FatalError(f"HTTP 404: {msg}. Is the model name right? `GET /v1/models` lists what the server serves.")
    if status == 400 or status == 422:
        if "structured_outputs" in low or "unrecognized request argument" in low or "extra inputs" in low:
            return FatalError(f"HTTP {status}: the endpoint rejected a request field ({msg}). "
                              "`--answer choice` needs vLLM's structured_outputs; use `--answer logprobs` "
                              "(OpenAI, vLLM) or `--answer generate` instead.")
        if "context" in low and ("length" in low or "window" in low) or "maximum model length" in low \
                or "too long" in low:
            return FatalError(f"HTTP {status}: prompt too long for the model's context ({msg}). "
                              "Raise the server's --max-model-len or cap images with --max-side.")
        if "logprobs" in low:
            return FatalError(f"HTTP {status}: the endpoint rejected log-probs ({msg}). "
                              "Raise vLLM's --max-logprobs or use `--answer generate`.")
        return FatalError(f"HTTP {status}: bad request ({msg})")
    if status == 429 or status >= 500 or status == 408:
        return RetryableError(f"HTTP {status}: {msg[:120]}", _retry_after(headers))
    return FatalError(f"HTTP {status}: {msg}")


class Endpoint:
    """One OpenAI-compatible base URL, with its in-flight count (for least-loaded dispatch)."""

    def __init__(self, url: str):
        self.base = normalize_base(url)
        self.in_flight = 0
        self.display = redact_url(self.base)


class Client:
    """POSTs JSON bodies to the least-loaded endpoint; returns decoded JSON or raises."""

    def __init__(self, endpoints: list[str], api_key: str | None, *, timeout: float = 120.0,
                 connections: int = 256, extra_headers: dict | None = None):
        self.endpoints = [Endpoint(u) for u in endpoints]
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if extra_headers:
            self._headers.update(extra_headers)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Client":
        conn = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=conn, headers=self._headers,
                                             json_serialize=lambda o: orjson.dumps(o).decode())
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    def pick(self) -> Endpoint:
        return min(self.endpoints, key=lambda e: e.in_flight)

    async def post(self, path: str, body: bytes) -> dict:
        ep = self.pick()
        ep.in_flight += 1
        try:
            async with self.session.post(ep.base + path, data=body, timeout=self.timeout) as r:  # type: ignore[union-attr]
                data = await r.read()
                if r.status != 200:
                    raise classify(r.status, data, r.headers)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise RetryableError(f"connection error: {type(e).__name__}") from None
        except asyncio.TimeoutError:
            raise RetryableError("timeout") from None
        finally:
            ep.in_flight -= 1
        try:
            out = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise RetryableError("malformed JSON response") from None
        if not isinstance(out, dict):
            raise RetryableError("malformed response (not an object)")
        return out

    async def get_json(self, url: str) -> tuple[int, object]:
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:  # type: ignore[union-attr]
            data = await r.read()
            try:
                return r.status, orjson.loads(data)
            except orjson.JSONDecodeError:
                return r.status, data.decode("utf-8", "replace")[:200]

    async def health(self) -> list[str]:
        """Check every endpoint: /health (vLLM; optional elsewhere) and /v1/models. Returns the
        served model ids of the first endpoint; raises FatalError naming an unreachable endpoint."""
        models: list[str] | None = None
        for ep in self.endpoints:
            root = ep.base[: -len("/v1")]
            try:
                st, _ = await self.get_json(root + "/health")
                if st == 503:
                    raise FatalError(f"{ep.display}: /health says the engine is not ready (503)")
                st, data = await self.get_json(ep.base + "/models")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise FatalError(f"cannot reach {ep.display}: {type(e).__name__}: {e}") from None
            if st in (401, 403):
                raise FatalError(f"{ep.display}: authentication failed (HTTP {st}); check --api-key-env")
            if st != 200:
                continue  # some APIs do not list models; requests will tell
            ids = [m.get("id") for m in data.get("data", [])] if isinstance(data, dict) else []
            if models is None:
                models = [i for i in ids if i]
        return models or []
