"""The backend protocol: what the engine sends a run's requests to.

A backend answers one request at a time (`send`); the engine fans requests out, retries them and
writes the answers. The OpenAI-compatible HTTP backend (vLLM, GPT-4o, any server) and the local
contrastive scorer (CLIP/SigLIP, which batches concurrent requests itself) both implement it, so
every run kind has one streaming, resume, retry and progress path."""

from __future__ import annotations

from typing import Any, Protocol


class Backend(Protocol):
    """A source of answers. Entered as an async context (opens sessions, loads a model)."""

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def health(self) -> list[str]:
        """Check the backend can answer (raises FatalError naming what is wrong); the served model ids."""
        ...

    def prepare_image(self, path: str, media: str, max_side: int | None) -> Any:
        """An image's payload, made once per item in a worker thread (raises on an unreadable image)."""
        ...

    async def send(self, path: str, body: Any, *, key: object = None) -> dict:
        """One request -> its JSON reply. Raises RetryableError (transient), FatalError (stop the run) or
        UnavailableError (no server can answer now: the run stops, exit 5, resumable). `key`: the
        request's affinity key (one per unit, an int hash): requests with one key should reach one
        server (its prefix/image cache). Optional: the engine passes it only to a `send` that takes it."""
        ...
