"""HTTP client for OpenAI-compatible endpoints: raw aiohttp + orjson, retries, error classes.

Measured on the 2-core dev machine against a loopback stub (issue 3): the openai SDK spends ~4 ms
of client CPU per request, raw aiohttp + orjson ~0.2 ms, so the engine talks HTTP itself. Retry
decisions are a small value type (inspect_ai's shape): retryable faults back off exponentially with
full jitter and honour Retry-After; fatal faults (bad key, unknown model, context too long, an
unsupported request field) stop the run with a message instead of burning it.
"""

from __future__ import annotations

import base64
import email.utils
import random
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import orjson

from harness.backends.images import ImagePayload, encode_image


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
    # FIX: was rebuilt from p.hostname, which drops the brackets of an IPv6 host ([::1] -> ::1:8000)
    # and lower-cases it; everything after the last "@" of the netloc is the host[:port] as given.
    host = p.netloc.rpartition("@")[2]
    return urlunsplit((p.scheme, host, p.path, "", ""))


def normalize_base(url: str) -> str:
    """Accept http://host:port, .../v1 or .../v1/ and return the .../v1 base."""
    u = url.rstrip("/")
    u = u.removesuffix("/chat/completions")
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


def _scrub(text: str, secrets) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def classify(status: int, body: bytes, headers, *, key_hint: str = "", secrets=()) -> Exception:
    """Map an HTTP error response to a FatalError or RetryableError.

    key_hint: what to say about the API key on 401/403 (names the variable, never the key);
    secrets: strings cut out of the server's message (some servers echo the key they rejected)."""
    msg = _scrub(_error_message(body), secrets)
    low = msg.lower()
    if status in (401, 403):
        return FatalError(f"HTTP {status}: authentication failed ({msg}). "
                          + (key_hint or "Check the API key variable (--api-key-env)."))
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
        # FIX: credentials in the URL (http://user:pass@host/v1) made every request fail with aiohttp's
        # "Cannot combine AUTHORIZATION header with ... credentials encoded in URL" whenever an API
        # key was set (exit 2 before any question). The base URL now carries no credentials; they
        # become this endpoint's Basic auth header, used only when no API key (Bearer) is given.
        p = urlsplit(url)
        self.headers: dict[str, str] = {}
        self.password = unquote(p.password) if p.password else None
        if p.username or p.password:
            pair = f"{unquote(p.username or '')}:{self.password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self.base = normalize_base(redact_url(url))
        self.in_flight = 0
        self.display = self.base


class Client:
    """The OpenAI-compatible HTTP backend: POSTs JSON bodies to the least-loaded endpoint; returns
    decoded JSON or raises."""

    def __init__(self, endpoints: list[str], api_key: str | None, *, timeout: float = 120.0,
                 connections: int = 256, extra_headers: dict | None = None, key_env: str | None = None):
        self.endpoints = [Endpoint(u) for u in endpoints]
        self._headers = {"Content-Type": "application/json"}
        self.key_env = key_env  # the name of the variable holding the key, for messages
        self._has_key = bool(api_key)
        self._secrets = tuple(s for s in [api_key, *(e.password for e in self.endpoints)] if s)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
            for e in self.endpoints:  # the API key wins over URL credentials (one Authorization header)
                e.headers.pop("Authorization", None)
        if extra_headers:
            self._headers.update(extra_headers)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._rr = 0
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        conn = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=conn, headers=self._headers,
                                             json_serialize=lambda o: orjson.dumps(o).decode())
        return self

    async def __aexit__(self, *exc) -> None:
        if self.session is not None:
            await self.session.close()

    def pick(self) -> Endpoint:
        # FIX: ties went to the first endpoint, so at low concurrency (or with fast replies) the other
        # --endpoint values got nothing; the least-loaded one still wins, ties rotate.
        n = len(self.endpoints)
        self._rr = (self._rr + 1) % n
        return min((self.endpoints[(self._rr + i) % n] for i in range(n)), key=lambda e: e.in_flight)

    async def send(self, path: str, body: dict | bytes, *, root: bool = False) -> dict:
        """POST a JSON body to `path` under /v1, or under the server root with `root` (vLLM's /tokenize)."""
        if not isinstance(body, bytes):
            body = orjson.dumps(body)
        ep = self.pick()
        ep.in_flight += 1
        try:
            base = ep.base[: -len("/v1")] if root else ep.base
            async with self.session.post(base + path, data=body, timeout=self.timeout,  # type: ignore[union-attr]
                                         headers=ep.headers or None) as r:
                data = await r.read()
                if r.status != 200:
                    raise classify(r.status, data, r.headers, key_hint=self.key_hint(), secrets=self._secrets)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise RetryableError(f"connection error: {type(e).__name__}") from None
        except TimeoutError:
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

    async def post_root(self, path: str, body: dict) -> dict:
        """One POST of a JSON body to a path under the server root (vLLM's /tokenize, /detokenize); no
        retries here: the caller wraps it in the engine's retry loop (harness.engine.fanout.with_retries)."""
        return await self.send(path, body, root=True)

    def prepare_image(self, path: str, media: str, max_side: int | None) -> ImagePayload:
        return encode_image(path, media=media, max_side=max_side)

    post = send  # the name the classification requests use

    def key_hint(self) -> str:
        """What to check after a 401/403: names the key variable, never shows the key."""
        if not self.key_env:
            return "Check the API key variable (--api-key-env)."
        if not self._has_key:
            return f"${self.key_env} is not set (--api-key-env names the variable holding the API key)."
        return f"Check the API key in ${self.key_env} (--api-key-env)."

    async def get_json(self, url: str, headers: dict | None = None) -> tuple[int, object]:
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=10),  # type: ignore[union-attr]
                                    headers=headers or None) as r:
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
                st, _ = await self.get_json(root + "/health", ep.headers)
                if st == 503:
                    raise FatalError(f"{ep.display}: /health says the engine is not ready (503)")
                st, data = await self.get_json(ep.base + "/models", ep.headers)
            except (TimeoutError, aiohttp.ClientError) as e:
                raise FatalError(_scrub(f"cannot reach {ep.display}: {type(e).__name__}: {e}", self._secrets)) from None
            if st in (401, 403):
                # FIX: said only "check --api-key-env"; name the variable (never the key)
                raise FatalError(f"{ep.display}: authentication failed (HTTP {st}). {self.key_hint()}")
            if st != 200:
                continue  # some APIs do not list models; requests will tell
            ids = [m.get("id") for m in data.get("data", [])] if isinstance(data, dict) else []
            if models is None:
                models = [i for i in ids if i]
        return models or []
