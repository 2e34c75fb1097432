"""Companion collections beside the chunks: the index record (``_records``) and the lock claims (``_lock``).

Both keep JSON bodies in VARCHAR fields; a Milvus collection needs a vector field, so each row
carries a constant 2-d dummy vector. Both are created on first use, with Strong consistency,
because their readers must see every write acknowledged before the read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from stores.milvus.config import MilvusStoreConfig

T = TypeVar("T")
DUMMY_VECTOR = [0.0, 1.0]
ID_MAX_BYTES = 128


class ChunkStoreAccess(Protocol):
    """What a companion uses of the chunk store (a :class:`stores.milvus.MilvusStore`, which builds
    the companions, so they name it by this protocol instead of importing it)."""

    config: MilvusStoreConfig

    def client(self) -> Any: ...

    def call(self, operation: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class CompanionCollection:
    """A collection of JSON rows beside the chunk collection, created when first used."""

    what = "companion"  # for error messages: "create <what> collection"
    text_fields: Sequence[tuple[str, int]] = ()  # VARCHAR fields after the primary key: (name, max bytes)

    def __init__(self, store: ChunkStoreAccess):
        self.store = store
        self._ready = False
        self.max_bytes: dict[str, int] = dict(self.text_fields)  # as the existing collection declares them

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _client(self) -> Any:
        client = self.store.client()
        if not self._ready:
            self._create_if_missing(client)
            self._ready = True
        return client

    def _create_if_missing(self, client: Any) -> None:
        from pymilvus import DataType, MilvusClient

        store, timeout = self.store, self.store.config.timeout_s
        if not store.call("has_collection", client.has_collection, self.name, timeout=timeout):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
            for field, max_bytes in self.text_fields:
                schema.add_field(field, DataType.VARCHAR, max_length=max_bytes)
            schema.add_field("dummy", DataType.FLOAT_VECTOR, dim=len(DUMMY_VECTOR))
            index = client.prepare_index_params()
            index.add_index(field_name="dummy", index_type="FLAT", metric_type="L2")
            store.call(
                f"create {self.what} collection",
                client.create_collection,
                self.name,
                schema=schema,
                index_params=index,
                consistency_level="Strong",
                timeout=timeout,
            )
        # Sizes as the collection was made: an older one may have smaller fields than today's.
        description = store.call(
            f"describe {self.what} collection", client.describe_collection, self.name, timeout=timeout
        )
        for column in description.get("fields", []):
            if column.get("name") in self.max_bytes:
                declared = (column.get("params") or {}).get("max_length")
                if declared is not None:
                    self.max_bytes[column["name"]] = int(declared)
        store.call(f"load {self.what} collection", client.load_collection, self.name, timeout=timeout)
