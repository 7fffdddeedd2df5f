"""HTTP client for OpenAI-compatible endpoints: raw aiohttp + orjson, retries, error classes.

Measured on the 2-core dev machine against a loopback stub (issue 3): the openai SDK spends ~4 ms
of client CPU per request, raw aiohttp + orjson ~0.2 ms, so the engine talks HTTP itself. Retry
decisions are a small value type (inspect_ai's shape): retryable faults back off exponentially with
full jitter and honour Retry-After; fatal faults (bad key, unknown model, context too long, an
unsupported request field) stop the run with a message instead of burning it.

Routing (issue 15): every endpoint has a circuit breaker. Consecutive connection errors, 5xx, timeouts
or malformed replies open it (a refused connection at once); a background probe (GET /health, else
/v1/models) takes a failing endpoint out and lets an open one back in half-open (one failure opens it
again, one success closes it). Requests go only to closed or half-open endpoints; while none is, they
wait (no retry is spent), and after `unavailable_after` seconds without one they raise
:class:`UnavailableError` (the run stops, exit 5). Requests carrying an affinity key (the engine passes
one per item) go to the endpoint that wins a rendezvous hash over the usable endpoints, so all of an
item's questions meet one server's prefix/multimodal cache and only a dead endpoint's items move; on an
endpoint given as `URL#dp=N` (a data-parallel vLLM with N engines) the key also picks one engine through
vLLM's `X-data-parallel-rank` request header.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import random
import re
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import orjson

from harness.backends.images import ImagePayload, encode_image


class FatalError(RuntimeError):
    """Stops the whole run (every further request would fail the same way)."""


class RetryableError(RuntimeError):
    def __init__(self, reason: str, retry_after: float | None = None, started: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.started = started  # time.monotonic() when the failed attempt was sent (a hang's length)


class UnavailableError(RuntimeError):
    """No endpoint can answer: none usable for `unavailable_after` seconds, or nearly every request fails
    the same way. The run stops (stats.unavailable, exit 5); unanswered questions are not recorded, so
    the same command finishes the run once a server answers again."""


# vLLM (0.32: entrypoints/generate/base/serving.py `_get_data_parallel_rank`) reads this header and sends
# the request to that engine of a data-parallel server (v1/engine/core_client.py skips its load balancer);
# a rank outside [0, data_parallel_size) is rejected with HTTP 400. Without it vLLM balances by load.
RANK_HEADER = "X-data-parallel-rank"
VLLM_SEQ_SLOTS = 256  # vLLM's default --max-num-seqs of the API server on a GPU (1024 on H100/H200, 128 on CPU)
_DP = re.compile(r"dp=(\d+)")
CLOSED, HALF, OPEN = "closed", "half-open", "open"
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit score (rendezvous hashing, rank choice)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def affinity_hash(key: object) -> int:
    """A stable 64-bit hash of an affinity key (the same in every process, unlike hash())."""
    if isinstance(key, int):
        return key & _M64
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "big")


def data_parallel(url: str) -> int:
    """N of an endpoint given as URL#dp=N (a data-parallel vLLM with N engines), else 0."""
    m = _DP.fullmatch(urlsplit(url).fragment)
    return int(m.group(1)) if m else 0


def endpoint_concurrency(url: str, concurrency: int | None) -> int:
    """Requests in flight for one endpoint: the given value, else vLLM's sequence slots per engine."""
    return concurrency or VLLM_SEQ_SLOTS * max(1, data_parallel(url))


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
    # the host[:port] as given (everything after the last "@"): p.hostname would drop an IPv6 host's
    # brackets ([::1] -> ::1:8000) and lower-case it
    host = p.netloc.rpartition("@")[2]
    frag = p.fragment if _DP.fullmatch(p.fragment) else ""  # #dp=N is routing, kept; anything else dropped
    return urlunsplit((p.scheme, host, p.path, "", frag))


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
    """One OpenAI-compatible base URL: its in-flight count, its circuit breaker and, for URL#dp=N, the
    data-parallel rank headers."""

    def __init__(self, url: str, concurrency: int | None = None):
        # credentials in the URL (http://user:pass@host/v1) become this endpoint's Basic auth header,
        # used only when no API key (Bearer) is given: aiohttp refuses a request carrying both
        p = urlsplit(url)
        self.headers: dict[str, str] = {}
        self.password = unquote(p.password) if p.password else None
        if p.username or p.password:
            pair = f"{unquote(p.username or '')}:{self.password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self.dp = data_parallel(url)
        self.base = normalize_base(urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path, "", "")))
        self.in_flight = 0
        self.limit = endpoint_concurrency(url, concurrency)
        self.sem: asyncio.Semaphore | None = None  # per-endpoint cap, when there are several endpoints
        self.display = self.base + (f"#dp={self.dp}" if self.dp else "")
        self.salt = affinity_hash(self.base)
        self.state = CLOSED
        self.failures = 0  # consecutive failed requests
        self.probe_failures = 0  # consecutive failed probes
        self.last_error: str | None = None
        self.requests = self.failed = self.opened = 0
        self.probe_path: str | None = None  # /health, or /v1/models where there is no /health
        self.rank_headers: list[dict[str, str]] = []
        self.wake: asyncio.Event | None = None  # set when the endpoint is taken out: probe it soon
        self.set_auth(None)

    def set_auth(self, bearer: bool | None) -> None:
        if bearer:
            self.headers.pop("Authorization", None)  # the API key wins over URL credentials
        self.rank_headers = [self.headers | {RANK_HEADER: str(r)} for r in range(self.dp)]


class Client:
    """The OpenAI-compatible HTTP backend: POSTs JSON bodies to a usable endpoint (the key's rendezvous
    winner, else the least loaded); returns decoded JSON or raises."""

    def __init__(self, endpoints: list[str], api_key: str | None, *, timeout: float = 120.0,
                 connections: int = 256, extra_headers: dict | None = None, key_env: str | None = None,
                 concurrency: int | None = None, unavailable_after: float = 120.0, breaker_failures: int = 10,
                 probe_interval: float = 1.0, health_interval: float = 10.0, probe_timeout: float = 10.0):
        self.endpoints = [Endpoint(u, concurrency) for u in endpoints]
        self._headers = {"Content-Type": "application/json"}
        self.key_env = key_env  # the name of the variable holding the key, for messages
        self._has_key = bool(api_key)
        self._secrets = tuple(s for s in [api_key, *(e.password for e in self.endpoints)] if s)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
            for e in self.endpoints:  # the API key wins over URL credentials (one Authorization header)
                e.set_auth(True)
        if extra_headers:
            self._headers.update(extra_headers)
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._rr = 0
        self.session: aiohttp.ClientSession | None = None
        self.unavailable_after = unavailable_after
        self.breaker_failures = breaker_failures
        self.probe_interval, self.health_interval = probe_interval, health_interval
        self.probe_timeout = aiohttp.ClientTimeout(total=min(probe_timeout, timeout))
        self._usable = list(self.endpoints)  # closed or half-open, in the given order
        self._down_since: float | None = None  # when the last usable endpoint went out
        self._up: asyncio.Event | None = None
        self._probes: list[asyncio.Task] = []
        self._unavailable: str | None = None

    async def __aenter__(self) -> Client:
        conn = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=conn, headers=self._headers,
                                             json_serialize=lambda o: orjson.dumps(o).decode())
        self._up = asyncio.Event()
        self._up.set()
        if len(self.endpoints) > 1:
            for e in self.endpoints:
                e.sem = asyncio.Semaphore(e.limit)
        self._probes = [asyncio.create_task(self._probe_loop(e)) for e in self.endpoints]
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self._probes:
            t.cancel()
        self._probes = []
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ routing
    def pick(self, key: int | None = None) -> Endpoint | None:
        """The endpoint of a request: the rendezvous winner of its affinity key among the usable
        endpoints (only a dead endpoint's keys move), else the least loaded (ties rotate); None when
        no endpoint is usable."""
        usable = self._usable
        n = len(usable)
        if n == 1:
            return usable[0]
        if n == 0:
            return None
        if key is not None:
            return max(usable, key=lambda e: _mix(key ^ e.salt))
        # the least loaded wins and ties rotate: otherwise, at low concurrency (or with fast replies)
        # the first endpoint would take everything
        self._rr = (self._rr + 1) % n
        return min((usable[(self._rr + i) % n] for i in range(n)), key=lambda e: e.in_flight)

    async def _wait_usable(self, key: int | None) -> Endpoint:
        """Wait (spending no retry) until an endpoint is usable; UnavailableError after `unavailable_after`."""
        while True:
            ep = self.pick(key)
            if ep is not None:
                return ep
            if self._unavailable is not None:
                raise UnavailableError(self._unavailable)
            since = self._down_since if self._down_since is not None else time.monotonic()
            left = since + self.unavailable_after - time.monotonic()
            if left <= 0:
                self._unavailable = self._unavailable_message()
                raise UnavailableError(self._unavailable)
            self._up.clear()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self._up.wait(), left)  # type: ignore[union-attr]
            except TimeoutError:
                pass

    def _unavailable_message(self) -> str:
        eps = "; ".join(f"{e.display} ({e.last_error or 'not answering'})" for e in self.endpoints)
        return _scrub(f"no endpoint answered for {self.unavailable_after:g} s (--unavailable-after): {eps}",
                      self._secrets)

    def _set_state(self, ep: Endpoint, state: str) -> None:
        if ep.state == state:
            return
        if state == OPEN:
            ep.opened += 1
            if ep.wake is not None:
                ep.wake.set()
        ep.state = state
        self._usable = [e for e in self.endpoints if e.state != OPEN]
        if self._usable:
            self._down_since = None
            if self._up is not None:
                self._up.set()
        elif self._down_since is None:
            self._down_since = time.monotonic()

    def _failure(self, ep: Endpoint, reason: str, *, hard: bool = False) -> None:
        ep.failures += 1
        ep.failed += 1
        ep.last_error = reason
        if ep.state == HALF or hard or ep.failures >= self.breaker_failures:
            self._set_state(ep, OPEN)

    def _success(self, ep: Endpoint) -> None:
        ep.failures = 0
        if ep.state == HALF:
            self._set_state(ep, CLOSED)

    # ------------------------------------------------------------------ health probes
    async def _probe(self, ep: Endpoint) -> str | None:
        """None when the endpoint answers its probe, else why not."""
        root = ep.base[: -len("/v1")]
        paths = [ep.probe_path] if ep.probe_path else [root + "/health", ep.base + "/models"]
        try:
            for url in paths:
                async with self.session.get(url, timeout=self.probe_timeout,  # type: ignore[union-attr]
                                            headers=ep.headers or None) as r:
                    await r.read()
                    if r.status == 404 and url.endswith("/health"):
                        continue  # no /health here: /v1/models tells
                    if r.status >= 500:
                        return f"{url.rsplit('/', 1)[1]} answered HTTP {r.status}"
                    ep.probe_path = url
                    return None
            return "no /health or /v1/models"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"probe: {type(e).__name__}" + (f": {e}" if str(e) else "")

    async def _probe_loop(self, ep: Endpoint) -> None:
        ep.wake = asyncio.Event()
        while True:
            if ep.state != OPEN:
                ep.wake.clear()
                try:
                    await asyncio.wait_for(ep.wake.wait(), self.health_interval)
                except TimeoutError:
                    pass
            if ep.state == OPEN:
                await asyncio.sleep(self.probe_interval)
            why = await self._probe(ep)
            if why is None:
                ep.probe_failures = 0
                if ep.state == OPEN:
                    ep.failures = 0
                    self._set_state(ep, HALF)
            else:
                ep.probe_failures += 1
                ep.last_error = why
                if ep.state != OPEN and ep.probe_failures >= 2:
                    self._set_state(ep, OPEN)

    # ------------------------------------------------------------------ requests
    async def send(self, path: str, body: dict | bytes, *, root: bool = False, key: object = None) -> dict:
        """POST a JSON body to `path` under /v1, or under the server root with `root` (vLLM's /tokenize).
        `key`: the request's affinity key (the engine passes one per item: int or str)."""
        if not isinstance(body, bytes):
            body = orjson.dumps(body)
        h = None if key is None else key if type(key) is int else affinity_hash(key)
        ep = self.pick(h) or await self._wait_usable(h)
        sem = ep.sem
        if sem is not None:
            await sem.acquire()
        headers = ep.rank_headers[_mix(h) % ep.dp] if ep.dp and h is not None else ep.headers or None
        ep.in_flight += 1
        ep.requests += 1
        t0 = time.monotonic()
        try:
            base = ep.base[: -len("/v1")] if root else ep.base
            async with self.session.post(base + path, data=body, timeout=self.timeout,  # type: ignore[union-attr]
                                         headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    err = classify(r.status, data, r.headers, key_hint=self.key_hint(), secrets=self._secrets)
                    if isinstance(err, RetryableError):
                        err.started = t0
                        if r.status != 429:  # rate limiting is no sign of a broken server
                            self._failure(ep, err.reason)
                    raise err
        except aiohttp.ClientConnectorError as e:  # nothing listens there: out at once
            self._failure(ep, f"connection error: {type(e).__name__}", hard=True)
            raise RetryableError(f"connection error: {type(e).__name__}", started=t0) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            self._failure(ep, f"connection error: {type(e).__name__}")
            raise RetryableError(f"connection error: {type(e).__name__}", started=t0) from None
        except TimeoutError:
            self._failure(ep, "timeout")
            raise RetryableError("timeout", started=t0) from None
        finally:
            ep.in_flight -= 1
            if sem is not None:
                sem.release()
        try:
            out = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._failure(ep, "malformed JSON response")
            raise RetryableError("malformed JSON response", started=t0) from None
        if not isinstance(out, dict):
            self._failure(ep, "malformed response (not an object)")
            raise RetryableError("malformed response (not an object)", started=t0)
        if ep.failures:
            self._success(ep)
        return out

    def stats(self) -> dict:
        """Per endpoint: requests sent, failed, times taken out, state (run.json `backend`)."""
        return {"endpoints": [{"url": _scrub(e.display, self._secrets), "requests": e.requests, "failed": e.failed,
                               "opened": e.opened, "state": e.state, "last_error": e.last_error}
                              for e in self.endpoints]}

    async def post_root(self, path: str, body: dict) -> dict:
        """One POST of a JSON body to a path under the server root (vLLM's /tokenize, /detokenize); no
        retries here: the caller wraps it in the engine's retry loop (harness.engine.fanout.with_retries)."""
        return await self.send(path, body, root=True)

    def prepare_image(self, path: str, media: str, max_side: int | None) -> ImagePayload:
        return encode_image(path, media=media, max_side=max_side)

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
        """Check every endpoint: /health (vLLM; optional elsewhere) and /v1/models. Returns the served
        model ids of the first reachable endpoint. An unreachable endpoint among several is taken out
        (its probe lets it in when it answers); raises FatalError when none is reachable."""
        models: list[str] | None = None
        down: list[str] = []
        for ep in self.endpoints:
            root = ep.base[: -len("/v1")]
            try:
                st, _ = await self.get_json(root + "/health", ep.headers)
                if st == 503:
                    raise FatalError(f"{ep.display}: /health says the engine is not ready (503)")
                st, data = await self.get_json(ep.base + "/models", ep.headers)
            except (TimeoutError, aiohttp.ClientError, FatalError) as e:
                why = str(e) if isinstance(e, FatalError) else f"cannot reach {ep.display}: {type(e).__name__}: {e}"
                down.append(_scrub(why, self._secrets))
                ep.last_error = down[-1]
                self._set_state(ep, OPEN)
                continue
            if st in (401, 403):
                # name the variable holding the key (never the key)
                raise FatalError(f"{ep.display}: authentication failed (HTTP {st}). {self.key_hint()}")
            if st != 200:
                continue  # some APIs do not list models; requests will tell
            ids = [m.get("id") for m in data.get("data", [])] if isinstance(data, dict) else []
            if models is None:
                models = [i for i in ids if i]
        if len(down) == len(self.endpoints):
            raise FatalError("; ".join(down))
        return models or []
