"""The benchmark's stub: tests.support.stub_server.Stub (instant, no faults) in its own process,
plus what the benchmark needs to see from the server side:

  - arrival order of image requests (key: the image part's `uuid`, else a digest of its URL), to
    measure prefix-cache locality;
  - per distinct image: how many requests carried it and how many distinct payloads (data-URL
    bodies) it arrived as (1 = encoded once and reused byte for byte);
  - no per-text bookkeeping (the test Stub keeps a counter per question text, which would grow with
    a million distinct questions: the server's memory is not what is measured here).

    python -m bench._client_stub --port N [--latency S]   # GET /bench/stats, POST /bench/reset
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

import orjson
from aiohttp import web

from tests.support.stub_server import Stub

ROOT = Path(__file__).resolve().parents[1]


class _Sink:
    """Stands in for the Stub's per-text counters: remembers nothing."""

    def __getitem__(self, key):
        return 0

    def __setitem__(self, key, value):
        pass


class BenchStub(Stub):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.by_text = _Sink()  # type: ignore[assignment]
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.arrival_keys: list[str] = []
        self.images: dict[str, dict] = {}  # key -> {"n": requests, "payloads": set of digests}

    def pick_fault(self, text: str) -> str | None:  # no faults, and no per-text attempt counter
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # aiohttp caches the body: Stub.chat reads it again for free
        if b'"image_url"' in raw:
            body = orjson.loads(raw)
            content = body["messages"][-1]["content"]
            for part in content if isinstance(content, list) else ():
                if part.get("type") != "image_url":
                    continue
                url = part["image_url"]["url"]
                digest = hashlib.blake2b(url.encode(), digest_size=12).hexdigest()
                key = part.get("uuid") or digest
                self.arrival_keys.append(key)
                rec = self.images.setdefault(key, {"n": 0, "payloads": set(), "data_url": 0})
                rec["n"] += 1
                rec["payloads"].add(digest)
                rec["data_url"] += url.startswith("data:")
        return await super().chat(request)

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({
            "requests": self.requests,
            "arrival_keys": self.arrival_keys,
            "images": {k: {"n": v["n"], "payloads": len(v["payloads"]), "data_url": v["data_url"]}
                       for k, v in self.images.items()},
        }), content_type="application/json")

    async def do_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/bench/stats", self.stats)
        app.router.add_post("/bench/reset", self.do_reset)
        return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubProcess:
    """Start `python -m bench._client_stub` as a child process; its CPU is not the client's."""

    def __init__(self, model: str = "stub-model", latency: float = 0.0):
        self.port = free_port()
        self.model, self.latency = model, latency
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"

    def __enter__(self) -> Self:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench._client_stub", "--port", str(self.port),
                                      "--model", self.model, "--latency", str(self.latency)], cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.root + "/health", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("bench stub did not start") from None
                time.sleep(0.05)
        import psutil
        self.ps = psutil.Process(self.proc.pid)
        return self

    def cpu(self) -> float:
        """The stub process's CPU seconds so far (user + system)."""
        t = self.ps.cpu_times()
        return t.user + t.system

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.root + "/bench/reset", method="POST"), timeout=10).read()

    def stats(self) -> dict:
        return orjson.loads(urllib.request.urlopen(self.root + "/bench/stats", timeout=60).read())

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="stub-model")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    a = ap.parse_args()
    stub = BenchStub(model=a.model, latency=a.latency)
    web.run_app(stub.app(), host="127.0.0.1", port=a.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
