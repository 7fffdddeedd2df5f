"""A loopback OpenAI-compatible stub for what real servers cannot do on demand: faults, latency, load.

Answers are deterministic: the letter is a hash of the user text (so an interrupted and an
uninterrupted run must produce identical results). Faults are injected per request text on its first
attempts only, so every question is eventually answerable:
    faults = {"429": 0.1, "500": 0.05, "503": 0.05, "drop": 0.05, "slow": 0.02, "malformed": 0.05, "empty": 0.05}
Run standalone: python -m tests.support.stub_server --port 8001 [--faults 429=0.1,drop=0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import threading
from collections import Counter, defaultdict

import orjson
from aiohttp import web

LETTERS = "ABCD"


def _h(s: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.blake2b((salt + s).encode(), digest_size=8).digest(), "big")


def user_text(body: dict) -> str:
    msg = body["messages"][-1]["content"]
    if isinstance(msg, str):
        return msg
    return "".join(p.get("text", "") for p in msg if p.get("type") == "text")


def offered_letters(text: str) -> str:
    return "".join(L for L in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if f"\n{L}. " in text) or LETTERS


class Stub:
    def __init__(self, *, faults: dict[str, float] | None = None, fault_attempts: int = 2, latency: float = 0.0,
                 slow_seconds: float = 5.0, model: str = "stub-model", api_key: str | None = None,
                 capabilities: tuple[str, ...] = ("structured_outputs", "logprobs")):
        self.faults = faults or {}
        self.fault_attempts = fault_attempts
        self.latency, self.slow_seconds = latency, slow_seconds
        self.model, self.api_key = model, api_key
        self.capabilities = capabilities
        self.attempts: Counter[str] = Counter()
        self.requests = 0
        self.faults_sent: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.keep_bodies = False
        self.arrivals: list[tuple[float, str]] = []  # (time, image url) for locality measures
        self.by_text: dict[str, int] = defaultdict(int)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_status = "completed"

    def answer(self, text: str) -> str:
        letters = offered_letters(text)
        if "Yes or No" in text:
            return "Yes" if _h(text) % 3 == 0 else "No"
        return letters[_h(text) % len(letters)]

    def pick_fault(self, text: str) -> str | None:
        k = self.attempts[text]
        self.attempts[text] += 1
        if k >= self.fault_attempts or not self.faults:
            return None
        r = (_h(text, f"fault{k}") % 10_000) / 10_000
        acc = 0.0
        for name, p in self.faults.items():
            acc += p
            if r < acc:
                return name
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        body = orjson.loads(await request.read())
        self.requests += 1
        if self.keep_bodies:
            self.bodies.append(body)
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": f"model {body.get('model')} does not exist"}}, status=404)
        if "structured_outputs" in body and "structured_outputs" not in self.capabilities:
            return web.json_response({"error": {"message": "Unrecognized request argument supplied: structured_outputs"}}, status=400)
        text = user_text(body)
        self.by_text[text] += 1
        fault = self.pick_fault(text)
        if fault:
            self.faults_sent[fault] += 1
        if fault == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "0.05"})
        if fault in ("500", "503"):
            return web.json_response({"error": {"message": "server error"}}, status=int(fault))
        if fault == "drop":
            request.transport.close()  # connection dropped mid-request
            return web.Response(status=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if fault == "malformed":
            return web.Response(body=b'{"choices": [', content_type="application/json")
        if self.latency:
            await asyncio.sleep(self.latency)
        content = "" if fault == "empty" else self.answer(text)
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if body.get("logprobs"):
            letters = offered_letters(text)
            best = self.answer(text)
            top = [{"token": best, "logprob": -0.1}] + [
                {"token": L, "logprob": -2.0 - i} for i, L in enumerate(letters) if L != best]
            top.append({"token": "The", "logprob": -9.0})
            choice["logprobs"] = {"content": [{"token": best, "logprob": -0.1, "top_logprobs": top[: body.get("top_logprobs", 5)]}]}
        resp = {"id": "stub", "object": "chat.completion", "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": len(text) // 4 + 10, "completion_tokens": 1, "total_tokens": len(text) // 4 + 11}}
        return web.Response(body=orjson.dumps(resp), content_type="application/json")

    async def completion(self, request: web.Request) -> web.Response:
        """Raw completions (a base LLM without chat template): the prompt is the text, the answer a letter."""
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        body = orjson.loads(await request.read())
        self.requests += 1
        if self.keep_bodies:
            self.bodies.append(body)
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": f"model {body.get('model')} does not exist"}}, status=404)
        if "messages" in body or not isinstance(body.get("prompt"), str):
            return web.json_response({"error": {"message": "a completion needs `prompt`"}}, status=400)
        text = body["prompt"]
        self.by_text[text] += 1
        resp = {"id": "stub", "object": "text_completion", "model": self.model,
                "choices": [{"index": 0, "text": " " + self.answer(text), "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 2, "total_tokens": len(text) // 4 + 2}}
        return web.Response(body=orjson.dumps(resp), content_type="application/json")

    # ---- OpenAI Batch API: files and batches (a batch completes as soon as it is created)
    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        f = form["file"]
        fid = f"file-{len(self.files)}"
        self.files[fid] = f.file.read()
        return web.json_response({"id": fid, "object": "file", "purpose": form.get("purpose")})

    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(body=self.files[request.match_info["fid"]], content_type="application/jsonl")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        out, errors = [], []
        for line in self.files[body["input_file_id"]].splitlines():
            req = orjson.loads(line)
            text = user_text(req["body"])
            self.requests += 1
            if self.pick_fault(text) is not None:  # a failed line goes to the error file
                errors.append({"custom_id": req["custom_id"], "response": {"status_code": 500, "body": {
                    "error": {"message": "server error"}}}, "error": None})
                continue
            content = self.answer(text)
            out.append({"custom_id": req["custom_id"], "response": {"status_code": 200, "body": {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 1}}}, "error": None})
        bid = f"batch-{len(self.batches)}"
        ofid, efid = f"file-out-{bid}", f"file-err-{bid}"
        self.files[ofid] = b"".join(orjson.dumps(x) + b"\n" for x in out)
        self.files[efid] = b"".join(orjson.dumps(x) + b"\n" for x in errors)
        self.batches[bid] = {"id": bid, "status": self.batch_status, "output_file_id": ofid,
                             "error_file_id": efid if errors else None,
                             "request_counts": {"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}}
        return web.json_response(self.batches[bid] | {"status": "validating"})

    async def get_batch(self, request: web.Request) -> web.Response:
        return web.json_response(self.batches[request.match_info["bid"]])

    async def models(self, request: web.Request) -> web.Response:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completion)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{fid}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches/{bid}", self.get_batch)
        return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubThread:
    """Run a Stub in a background thread (its own event loop) for in-process tests."""

    def __init__(self, stub: Stub, port: int | None = None):
        self.stub, self.port = stub, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._ready = threading.Event()

    def __enter__(self) -> StubThread:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stub server did not start")
        return self

    def _serve(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.stub.app(), access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, backlog=1024)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    def __exit__(self, *exc) -> None:
        async def stop():
            await self.runner.cleanup()
        fut = asyncio.run_coroutine_threadsafe(stop(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--faults", default="", help="e.g. 429=0.1,500=0.05,drop=0.05")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--model", default="stub-model")
    ap.add_argument("--api-key")
    a = ap.parse_args()
    faults = {k: float(v) for k, v in (x.split("=") for x in a.faults.split(",") if x)}
    stub = Stub(faults=faults, latency=a.latency, model=a.model, api_key=a.api_key)
    web.run_app(stub.app(), host="127.0.0.1", port=a.port, access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
