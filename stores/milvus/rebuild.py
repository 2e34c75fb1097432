"""Full rebuilds of a Milvus index beside the served one (:class:`stores.base.Rebuild`).

On engines with aliases (a Milvus server, Milvus Lite 3) the build is a new collection
``<name>__rebuild_<stamp>`` and the configured name is an alias moved to it in one step; on
Milvus Lite 2.5, which has no aliases, the build is a new database file that replaces the served
file in one rename. Queries read the old index until the switch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from core.records import RecordStore
from stores.base import Rebuild
from stores.milvus.records import MilvusRecords

# The store is typed by what is used of it (client(), call(), config ...), not by MilvusStore:
# stores.milvus.store builds these objects, so importing it here, even for types, is a cycle.
MilvusStore = Any

REBUILD_INFIX = "__rebuild_"  # <collection>__rebuild_<UTC time>: a full rebuild's new collection
SWITCH_GRACE_S = 5.0  # how long a rebuild's old collection outlives the switch of its alias


def start_rebuild(served: MilvusStore, serving_records: RecordStore, stamp: str) -> Rebuild:
    if isinstance(serving_records, MilvusRecords):
        serving_records.bind()  # the record of what is served now, dropped after the switch
    if served.has_aliases:
        return CollectionRebuild(served, serving_records, stamp)
    return FileRebuild(served, stamp)


class CollectionRebuild(Rebuild):
    """A new collection ``<name>__rebuild_<stamp>``; the name becomes an alias of it."""

    def __init__(self, served: MilvusStore, serving_records: RecordStore, stamp: str):
        self.served = served
        self.serving_records = serving_records
        self.name = served.config.collection
        self.serving = served.serving_collection()
        for leftover in served.build_collections():  # from a rebuild that crashed before its switch
            if leftover != self.serving:
                drop_collection(served.with_collection(leftover))
        self.store: MilvusStore = served.with_collection(f"{served.config.collection}{REBUILD_INFIX}{stamp}")

    def served_sources_with_chunks(self, source_ids: Sequence[str]) -> set[str]:
        return set(self.served.sources_with_chunks(source_ids))

    def switch(self) -> str:
        try:
            previous = self.served.switch_to(self.store.config.collection)
        finally:
            self.store.close()
        if previous is not None and previous != self.name:  # a real collection of that name went in switch_to
            # Searches routed to the old collection just before the switch (a server's proxies cache
            # aliases) still run on it: dropped at once, it answered such a search with nothing.
            time.sleep(SWITCH_GRACE_S)
            drop_collection(self.served.with_collection(previous), records=False)
        if isinstance(self.serving_records, MilvusRecords):
            self.serving_records.drop()
        return f"full rebuild: {self.name!r} now serves {self.store.config.collection!r} (was {previous!r})"

    def discard(self) -> None:
        drop_collection(self.store)


class FileRebuild(Rebuild):
    """A new Milvus Lite 2.5 database file beside the served one, moved over it by one rename."""

    def __init__(self, served: MilvusStore, stamp: str):
        self.served = served
        self.name = served.config.collection
        self.serving = served.serving_collection()
        for leftover in served.lite_build_files():  # from a rebuild that crashed before its switch
            served.with_lite_path(leftover).delete_lite_file()
        self.store: MilvusStore = served.with_lite_path(served.lite_build_path(stamp))

    def served_sources_with_chunks(self, source_ids: Sequence[str]) -> set[str]:
        return set(self.served.sources_with_chunks(source_ids))

    def switch(self) -> str:
        # The served file's record goes with it: the build's own record, written under the same
        # name, is the record of what is served now.
        built = self.store.endpoint.lite_path
        assert built is not None  # the build store was made with with_lite_path()
        self.served.replace_lite_file(self.store)
        return (
            f"full rebuild: {self.served.endpoint.lite_path} replaced by the rebuilt database (built as {built.name})"
        )

    def discard(self) -> None:
        self.store.delete_lite_file()


def drop_collection(store: MilvusStore, records: bool = True) -> None:
    """Drop a collection that no name serves any more (and its record, unless dropped apart)."""
    try:
        if records:
            MilvusRecords(store).drop()
        store.drop()
    finally:
        store.close()
