"""Answer cache keyed by an explicit request hash (HELM style): same request, same answer, no cost.

SQLite (stdlib) in `--cache DIR`; writes are batched in transactions. The key is the sha256 of the
canonical request body with each image replaced by a digest of its content, so the key does not
depend on the endpoint, the API key or how the image travels.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import orjson


def request_key(body: dict) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class RequestCache:
    def __init__(self, folder: str | Path, *, batch: int = 256):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "responses.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self._pending: list[tuple[str, bytes]] = []
        self._batch = batch
        self.hits = 0

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            for k, v in self._pending:
                if k == key:
                    row = (v,)
                    break
        if row is None:
            return None
        self.hits += 1
        return orjson.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        self._pending.append((key, orjson.dumps(value)))
        if len(self._pending) >= self._batch:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)", self._pending)
            self._db.execute("COMMIT")
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._db.close()
