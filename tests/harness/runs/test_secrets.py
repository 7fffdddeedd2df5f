"""No secret reaches disk or the terminal: the API key (its value) and URL credentials are absent from
every file under --out, the cache folder and the captured output, through success and failure."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import orjson
from aiohttp import web

from harness.backends.http import Client, redact_url
from tests.support.engine_helpers import (
    CUB_SIMILAR,
    cli_env,
    harness_cmd,
    image_items,
    port_is_closed,
    read_results,
    run_cli,
)
from tests.support.stub_server import Stub, StubThread

KEY = "sk-test-SECRET-1234567890"
USER, PASSWORD = "alice", "pw-HUNTER2-secret"
SECRETS = [KEY, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), "SECRET-1234567890"]


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@")


def assert_clean(*texts: str, folders: list[Path]) -> int:
    """No secret in the given texts or in any file under the folders; returns the number of files read."""
    for t in texts:
        for s in SECRETS:
            assert s not in t, f"secret {s[:6]}... in output: {t[-500:]}"
    n = 0
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                n += 1
                for s in SECRETS:
                    assert s.encode() not in data, f"secret {s[:6]}... in {p}"
    return n


class EchoingStub(Stub):
    """Lists models without a key, and echoes a rejected key in its 401 message (as some APIs do)."""

    refused = 0

    async def chat(self, request):
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}":
            self.refused += 1
            return web.json_response({"error": {"message": f"Incorrect API key provided: {auth[7:]}"}}, status=401)
        return await super().chat(request)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})


class BasicAuthStub(Stub):
    """Behind a proxy that wants HTTP Basic credentials (from the URL) and no API key."""

    seen: list[str]

    def app(self):
        self.seen = []

        @web.middleware
        async def gate(request, handler):
            auth = request.headers.get("Authorization", "")
            self.seen.append(auth)
            if auth != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
                return web.json_response({"error": {"message": "proxy auth required"}}, status=401)
            return await handler(request)

        app = super().app()
        app.middlewares.append(gate)
        return app


def _args(url, data, out, *extra):
    return ["run", "--endpoint", url, "--data", data, "--out", out, "--quiet", "--api-key-env", "HARNESS_TEST_KEY",
            *extra]


def test_no_secret_on_disk_or_screen(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_KEY", KEY)
    data = image_items(tmp_path, 4)
    outputs = []
    # 1. success through a URL with credentials (the API key wins; the URL credentials are dropped)
    good = Stub(api_key=KEY)
    with StubThread(good) as st:
        rc, out, err = run_cli(capsys, *_args(with_credentials(st.url), CUB_SIMILAR, tmp_path / "ok", "--mode", "text",
                                              "--limit", "30", "--cache", tmp_path / "cache"))
        assert rc == 0, err
        outputs += [out, err]
        rc, out, err = run_cli(capsys, *_args(with_credentials(st.url), data, tmp_path / "img",
                                              "--cache", tmp_path / "cache"))
        assert rc == 0, err
        outputs += [out, err]
        assert good.requests > 16
    m = orjson.loads((tmp_path / "ok" / "run.json").read_bytes())
    assert m["endpoints"] == [st.url] and m["api_key_env"] == "HARNESS_TEST_KEY"
    assert len(read_results(tmp_path / "ok" / "results.jsonl")) == 120
    # 2. the key is refused at the health check
    with StubThread(Stub(api_key="sk-other")) as st:
        rc, out, err = run_cli(capsys, *_args(with_credentials(st.url), CUB_SIMILAR, tmp_path / "401", "--mode", "text"))
    assert rc == 4 and "HARNESS_TEST_KEY" in err
    outputs += [out, err]
    # 3. refused mid-run by a server that echoes the key it rejected
    echo = EchoingStub(api_key="sk-other")
    with StubThread(echo) as st:
        rc, out, err = run_cli(capsys, *_args(with_credentials(st.url), CUB_SIMILAR, tmp_path / "echo", "--mode", "text",
                                              "--cache", tmp_path / "cache"))
    assert rc == 4 and "Incorrect API key provided: ***" in err and echo.refused > 0, err
    assert "***" in orjson.loads((tmp_path / "echo" / "run.json").read_bytes())["stats"]["fatal"]
    outputs += [out, err]
    # 4. an unreachable endpoint with credentials
    dead = with_credentials(f"http://127.0.0.1:{port_is_closed()}/v1")
    rc, out, err = run_cli(capsys, *_args(dead, CUB_SIMILAR, tmp_path / "dead", "--mode", "text"))
    assert rc == 4 and "cannot reach http://127.0.0.1:" in err, err
    outputs += [out, err]
    n = assert_clean(*outputs, folders=[tmp_path / "ok", tmp_path / "img", tmp_path / "401", tmp_path / "echo",
                                        tmp_path / "dead", tmp_path / "cache"])
    assert n >= 10  # results.jsonl, run.json, summary.json of several runs, the cache database


def test_subprocess_output_has_no_secret(tmp_path):
    """The same through a real `harness run` process: stdout, stderr and files."""
    data = image_items(tmp_path, 3)
    for name, key in (("ok", KEY), ("bad", "sk-other")):
        with StubThread(Stub(api_key=key)) as st:
            r = subprocess.run(harness_cmd(*_args(with_credentials(st.url), data, tmp_path / name,
                                                  "--cache", tmp_path / "cache")),
                               env=cli_env(HARNESS_TEST_KEY=KEY, HARNESS_PROGRESS="1"), capture_output=True, check=False,
                               timeout=60)
        assert r.returncode == (0 if name == "ok" else 4), r.stderr.decode()
        assert_clean(r.stdout.decode(), r.stderr.decode(), folders=[tmp_path / name, tmp_path / "cache"])


def test_url_credentials_become_basic_auth_without_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_TEST_KEY", raising=False)
    stub = BasicAuthStub()
    with StubThread(stub) as st:
        rc, out, err = run_cli(capsys, *_args(with_credentials(st.url), CUB_SIMILAR, tmp_path / "o", "--mode", "text",
                                              "--limit", "10"))
    assert rc == 0, err
    assert stub.requests > 0 and all(s.startswith("Basic ") for s in stub.seen)
    m = orjson.loads((tmp_path / "o" / "run.json").read_bytes())
    assert m["endpoints"] == [st.url]
    assert_clean(out, err, folders=[tmp_path / "o"])


def test_redact_url_and_endpoint_base():
    assert redact_url(f"http://{USER}:{PASSWORD}@host:8000/v1?key=x#f") == "http://host:8000/v1"
    assert redact_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    c = Client([f"https://{USER}:{PASSWORD}@api.example.com"], None)
    ep = c.endpoints[0]
    assert ep.base == ep.display == "https://api.example.com/v1"
    c2 = Client([f"https://{USER}:{PASSWORD}@api.example.com"], KEY)
    assert c2.endpoints[0].headers == {}  # the API key (Bearer) wins
