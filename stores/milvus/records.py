"""The index record (:mod:`core.records`) kept in Milvus, beside the chunks it describes.

:class:`MilvusRecords` keeps it in a companion collection ``<collection>_records`` on the same
endpoint as the chunks, so every machine sharing the index shares the record too. Reads of every
source are streamed page by page with an iterator over the primary key, never with offset +
limit (Milvus refuses an offset + limit above 16,384).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from typing import Any, Protocol

from core.records import RecordStore, RecordTooLarge, SourceRecord
from stores import filters
from stores.milvus.companion import DUMMY_VECTOR, ChunkStoreAccess, CompanionCollection

# A source's row is keyed by a digest of its id, never the id itself: source ids can hold quotes
# and control characters that some engines mishandle in primary keys (Milvus Lite 2.5 fails an
# upsert whose key holds a quote). The run row takes an id no digest key can.
RECORDS_SUFFIX = "_records"
RUN_ROW_ID = "run"
# Body sizes: collections made before records had room for long source ids kept 8,192 bytes.
BODY_MAX_BYTES = 65535
SCOPE_MAX_BYTES = 2048


class RecordsStoreAccess(ChunkStoreAccess, Protocol):
    """What the record uses of the chunk store beyond its client: where the served chunks are, and paging."""

    def serving_collection(self) -> str | None: ...

    def query_pages(
        self, client: Any, collection: str, expression: str, output_fields: Sequence[str], page_size: int
    ) -> Generator[dict[str, Any], None, None]: ...


def source_row_id(source_id: str) -> str:
    return "source:" + hashlib.sha256(source_id.encode("utf-8", "surrogatepass")).hexdigest()


class MilvusRecords(CompanionCollection, RecordStore):
    """Records in the companion collection ``<collection>_records``, through the chunk store's client.

    A Milvus collection needs a vector field, so each row carries a constant 2-d dummy vector;
    the record itself is a JSON document in a VARCHAR field, with scope and kind as scalar fields
    for filtering. Every size is checked here before writing, so Milvus Lite (which does not
    enforce VARCHAR limits) refuses exactly what a Milvus server would.
    """

    what = "records"
    text_fields = (("kind", 16), ("scope", SCOPE_MAX_BYTES), ("body", BODY_MAX_BYTES))
    _PAGE = 1000  # rows per upsert, and in the first page read
    _MAX_READ_PAGE = 16_384  # Milvus' ceiling for a query's limit
    _READ_PAGE_BYTES = 4 << 20  # Milvus Lite 2.5 stalls on pages of 12 MB and more (see MilvusStore.rows)
    _IDS_PER_FILTER = 256  # ids per ``id in [...]`` expression: keeps each filter small for the server's parser

    def __init__(self, store: RecordsStoreAccess):
        super().__init__(store)
        self.store: RecordsStoreAccess = store
        self._name: str | None = None
        self._dropped = False

    @property
    def name(self) -> str:
        """The record of the collection the store serves (behind an alias, the record follows the
        chunks). Resolved on first use, after the run prepared the collection, or by :meth:`bind`."""
        return self.bind()._name  # type: ignore[return-value]

    def bind(self) -> MilvusRecords:
        """Fix this record to the collection the store serves now, so that a later switch of the
        alias (a full rebuild) cannot move it to the new collection's record."""
        if self._name is None:
            self._name = f"{self.store.serving_collection() or self.store.config.collection}{RECORDS_SUFFIX}"
        return self

    def drop(self) -> None:
        """Drop the record with the collection it describes (after a full rebuild replaced both)."""
        client = self.store.client()
        if self.store.call("has_collection", client.has_collection, self.name, timeout=self.store.config.timeout_s):
            self.store.call(
                "drop records collection", client.drop_collection, self.name, timeout=self.store.config.timeout_s
            )
        self._dropped = True

    def _client(self) -> Any:
        if self._dropped:
            raise RuntimeError(f"the index record {self.name!r} was dropped by a full rebuild")
        return super()._client()

    def _query(self, expression: str, limit: int) -> list[dict[str, Any]]:
        """Rows of a query known to match at most ``limit`` rows (ids listed, the run row)."""
        return list(
            self.store.call(
                "query records",
                self._client().query,
                self.name,
                filter=expression,
                output_fields=["id", "body"],
                limit=limit,
                timeout=self.store.config.timeout_s,
            )
        )

    def _iterate(self, expression: str) -> Iterator[dict[str, Any]]:
        """Every row matching ``expression``, page by page (an iterator over the primary key,
        safe here because row ids are ``source:<hex digest>``, ``run``, never outside text).

        Each page costs a round trip (about 30 ms on Milvus Lite), so after a first page of
        ``_PAGE`` rows the pages grow to what ``_READ_PAGE_BYTES`` holds at twice the largest row
        seen: row ids are digests, so the first page is a random sample of the rows' sizes.
        """
        page_size, after = self._PAGE, ""
        while True:
            bounded = filters.all_of(expression, f"id > {filters.string_literal(after)}") if after else expression
            count, largest, resize_to = 0, 1, 0
            with closing(self.store.query_pages(self._client(), self.name, bounded, ["id", "body"], page_size)) as rows:
                for row in rows:
                    yield row
                    count, after = count + 1, row["id"]
                    largest = max(largest, len(row["id"]) + len(row["body"].encode("utf-8")))
                    if count == page_size and page_size < self._MAX_READ_PAGE:
                        fitting = min(self._MAX_READ_PAGE, self._READ_PAGE_BYTES // (2 * largest))
                        if fitting >= 2 * page_size:
                            resize_to = fitting
                            break
            if not resize_to:
                return
            page_size = resize_to

    def get(self, source_ids: Sequence[str]) -> dict[str, SourceRecord]:
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(source_ids), self._IDS_PER_FILTER):
            ids = [source_row_id(source_id) for source_id in source_ids[start : start + self._IDS_PER_FILTER]]
            expression = filters.all_of(filters.eq("kind", "source"), filters.in_list("id", ids))
            for row in self._query(expression, len(ids)):
                record = SourceRecord.from_json(row["body"])
                found[record.source_id] = record
        return found

    def in_scope(self, scope: str) -> Iterator[SourceRecord]:
        for row in self._iterate(filters.all_of(filters.eq("kind", "source"), filters.eq("scope", scope))):
            yield SourceRecord.from_json(row["body"])

    def all(self) -> Iterator[SourceRecord]:
        for row in self._iterate(filters.eq("kind", "source")):
            yield SourceRecord.from_json(row["body"])

    def put(self, records: Sequence[SourceRecord]) -> None:
        if records:
            self._client()  # learns the body's size limit
            rows = [self._row(record) for record in records]
            for start in range(0, len(rows), self._PAGE):
                self._upsert(rows[start : start + self._PAGE])

    def _row(self, record: SourceRecord) -> dict[str, Any]:
        body = record.to_json()
        body_bytes, scope_bytes = (
            len(body.encode("utf-8", "surrogatepass")),
            len(record.scope.encode("utf-8", "surrogatepass")),
        )
        if scope_bytes > SCOPE_MAX_BYTES:
            raise RecordTooLarge(
                f"the source scope is {scope_bytes} bytes of UTF-8; the index record keeps at most {SCOPE_MAX_BYTES}"
            )
        if body_bytes > self.max_bytes["body"]:
            raise RecordTooLarge(
                f"the index record of this source is {body_bytes} bytes of UTF-8 (its id alone is "
                f"{len(record.source_id.encode('utf-8', 'surrogatepass'))}); {self.name!r} keeps at most "
                f"{self.max_bytes['body']}"
            )
        return {
            "id": source_row_id(record.source_id),
            "kind": "source",
            "scope": record.scope,
            "body": body,
            "dummy": DUMMY_VECTOR,
        }

    def delete(self, source_ids: Sequence[str]) -> None:
        for start in range(0, len(source_ids), self._PAGE):
            row_ids = [source_row_id(source_id) for source_id in source_ids[start : start + self._PAGE]]
            self.store.call(
                "delete records", self._client().delete, self.name, ids=row_ids, timeout=self.store.config.timeout_s
            )

    def put_run(self, summary: dict[str, Any]) -> None:
        body = json.dumps(summary, sort_keys=True, default=str)  # a compact summary: counts, no failure list
        self._upsert([{"id": RUN_ROW_ID, "kind": "run", "scope": "", "body": body, "dummy": DUMMY_VECTOR}])

    def last_run(self) -> dict[str, Any] | None:
        rows = self._query(filters.eq("kind", "run"), 1)
        return json.loads(rows[0]["body"]) if rows else None

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        self.store.call("upsert records", self._client().upsert, self.name, rows, timeout=self.store.config.timeout_s)
