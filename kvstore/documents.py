"""Documents: a long text kept as overlapping token pieces, each piece a registered chunk.

`cover` is the one rule for cutting a sequence into windows (a document's tokens into pieces,
its pieces into analysis windows). `DocumentRecords` keeps one JSON file per document,
`<root>/<id>.json`, written atomically: {"id", "created", "characters", "tokens",
"chunk_tokens", "overlap_tokens", "chunks" (the ordered chunk IDs of the pieces), "tenant" (the
owner; absent in records written before tenants existed: "default")}. The records
are local to this node (the chunks they name are shared through the registry as usual).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

from kvstore.atomic import atomic_write, remove_temp_files
from kvstore.keys import is_key
from kvstore.registry import owner

log = logging.getLogger(__name__)

# server.serving_engine.random_id("doc"): the prefix and a uuid4 in hex.
_ID = re.compile(r"doc-[0-9a-f]{32}")
SUFFIX = ".json"

Record = dict[str, Any]
_INT_FIELDS = ("created", "characters", "tokens", "chunk_tokens", "overlap_tokens")


def cover(n: int, size: int, step: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most `size` over range(n), starting `step` apart from 0; the
    last one is cut at `n`, and none starts after one that already reached the end."""
    if n < 1 or size < 1 or step < 1:
        raise ValueError("cover needs n, size and step of at least 1")
    spans, start = [], 0
    while True:
        end = min(start + size, n)
        spans.append((start, end))
        if end == n:
            return spans
        start += step


def is_document_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


def _valid(record: object, doc_id: str) -> bool:
    return (isinstance(record, dict) and record.get("id") == doc_id
            and all(isinstance(record.get(f), int) for f in _INT_FIELDS)
            and isinstance(record.get("chunks"), list) and all(isinstance(k, str) and is_key(k) for k in record["chunks"])
            and isinstance(owner(record), str))


class DocumentRecords:
    """Document ID -> record, one file each under `root`. Thread-safe: every change is one
    atomic file operation. Documents are few enough that a listing reads every record."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_temp_files(self.root, sharded=False)

    def _path(self, doc_id: str) -> Path:
        if not is_document_id(doc_id):
            raise ValueError(f"invalid document ID {doc_id[:80]!r}")
        return self.root / f"{doc_id}{SUFFIX}"

    def write(self, record: Record) -> None:
        if not _valid(record, record.get("id", "")):
            raise ValueError("malformed document record")
        atomic_write(self._path(record["id"]), json.dumps(record).encode())

    def get(self, doc_id: str) -> Optional[Record]:
        try:
            record = json.loads(self._path(doc_id).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            record = None
        if not _valid(record, doc_id):
            log.warning("documents: ignoring malformed record %s", doc_id)
            return None
        return record

    def delete(self, doc_id: str) -> bool:
        try:
            self._path(doc_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def all(self) -> list[Record]:
        """Every record, ordered by (created, id)."""
        ids = [p.name.removesuffix(SUFFIX) for p in self.root.glob(f"doc-*{SUFFIX}")]
        records = [r for r in (self.get(i) for i in ids if is_document_id(i)) if r is not None]
        return sorted(records, key=lambda r: (r["created"], r["id"]))

    def list(self, after: Optional[str] = None, limit: int = 100, tenant: Optional[str] = None) -> list[Record]:
        """Up to `limit` records in (created, id) order after the ID `after` (ValueError if unknown);
        with `tenant`, only the ones it owns."""
        records = [r for r in self.all() if tenant is None or owner(r) == tenant]
        start = 0
        if after is not None:
            ids = [r["id"] for r in records]
            if after not in ids:
                raise ValueError(f"unknown document id {after[:80]}")
            start = ids.index(after) + 1
        return records[start:start + limit]
