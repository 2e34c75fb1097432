"""The existing collection as Milvus describes it, and what in it does not fit the spec."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stores.milvus.config import (
    DESCRIPTION_KEY,
    PROPERTY_MODEL,
    PROPERTY_SPARSE_MODEL,
    VARCHAR_MAX_BYTES,
    VECTOR_FIELD_TYPES,
    MilvusStoreConfig,
)

# --------------------------------------------------------------------------------------------
# The existing collection, as described by Milvus.


def _description_properties(description: Any) -> dict[str, str]:
    """The properties a collection keeps as JSON in its schema description ({} for anything else)."""
    try:
        stored = json.loads(description) if isinstance(description, str) else None
    except ValueError:
        return {}
    properties = stored.get(DESCRIPTION_KEY) if isinstance(stored, dict) else None
    return {str(k): str(v) for k, v in properties.items()} if isinstance(properties, dict) else {}


@dataclass(frozen=True)
class CollectionLayout:
    """What an existing collection holds: enough to check it against a spec and to validate rows."""

    fields: dict[str, tuple[str, dict[str, Any], bool]]  # name -> (data type name, params, is primary)
    properties: dict[str, str]
    metric: str | None
    bm25_outputs: dict[str, str] = field(default_factory=dict)  # BM25 function output field -> its input field

    @classmethod
    def from_description(cls, description: dict[str, Any], metric: str | None) -> CollectionLayout:
        fields = {
            f["name"]: (
                getattr(f["type"], "name", str(f["type"])),
                dict(f.get("params") or {}),
                bool(f.get("is_primary")),
            )
            for f in description.get("fields", [])
        }
        properties = {
            **_description_properties(description.get("description")),
            **{str(k): str(v) for k, v in (description.get("properties") or {}).items()},
        }
        bm25_outputs = {}
        for function in description.get("functions") or []:
            if getattr(function.get("type"), "name", str(function.get("type"))) in ("BM25", "1"):
                for output in function.get("output_field_names") or []:
                    bm25_outputs[output] = (function.get("input_field_names") or [""])[0]
        if not bm25_outputs:
            # Milvus Lite 2.5 describes no functions, only flags their output fields; the BM25
            # input is the analyzed text field, the only one this store creates.
            analyzed = [
                f["name"]
                for f in description.get("fields", [])
                if str((f.get("params") or {}).get("enable_analyzer")).lower() == "true"
            ]
            for f in description.get("fields", []):
                if f.get("is_function_output") and len(analyzed) == 1:
                    bm25_outputs[f["name"]] = analyzed[0]
        return cls(fields=fields, properties=properties, metric=metric, bm25_outputs=bm25_outputs)

    def analyzer_params(self, name: str) -> dict[str, Any] | None:
        raw = self.fields.get(name, ("", {}, False))[1].get("analyzer_params")
        if raw is None:
            return None
        return json.loads(raw) if isinstance(raw, str) else dict(raw)

    def sparse_problems(self, where: str, config: MilvusStoreConfig, sparse_model_id: str | None) -> list[str]:
        """What keeps this collection from serving the spec's BM25 and learned sparse fields."""
        problems = []
        rebuild = "use a new collection name (or drop this one to rebuild it with the sparse fields)"
        if config.bm25 is not None:
            name = config.bm25.field
            if self.fields.get(name, ("",))[0] != "SPARSE_FLOAT_VECTOR" or self.bm25_outputs.get(name) != "text":
                problems.append(
                    f"{where} has no BM25 field {name!r} computed from 'text' (it was created without bm25); {rebuild}"
                )
            else:
                stored, wanted = self.analyzer_params("text"), config.bm25.analyzer_params
                if stored is not None and stored != wanted:
                    problems.append(
                        f"{where} analyses text for BM25 with {json.dumps(stored)}; the spec's analyzer is "
                        f"{json.dumps(wanted)}. The analyzer is fixed when a collection is created: {rebuild}"
                    )
        if config.learned_sparse is not None:
            name = config.learned_sparse.field
            if self.fields.get(name, ("",))[0] != "SPARSE_FLOAT_VECTOR" or name in self.bm25_outputs:
                problems.append(f"{where} has no learned sparse field {name!r}; {rebuild}")
            stored_model = self.properties.get(PROPERTY_SPARSE_MODEL)
            if sparse_model_id and stored_model and stored_model != sparse_model_id:
                problems.append(
                    f"{where} stores sparse vectors from {stored_model}; the spec's sparse encoder is "
                    f"{sparse_model_id}. Sparse vectors of different models are not comparable: use a new collection "
                    "name"
                )
        return problems

    def dimension(self, vector_field: str) -> int | None:
        kind, params, _ = self.fields.get(vector_field, ("", {}, False))
        return int(params["dim"]) if kind in VECTOR_FIELD_TYPES.values() and "dim" in params else None

    def max_bytes(self, name: str) -> int:
        return int(self.fields[name][1].get("max_length", VARCHAR_MAX_BYTES))

    @property
    def model_id(self) -> str | None:
        return self.properties.get(PROPERTY_MODEL)

    def problems(
        self,
        where: str,
        vector_field: str,
        dimension: int,
        model_id: str,
        metric: str,
        vector_type: str = "FLOAT_VECTOR",
    ) -> list[str]:
        expected = {
            "id": "VARCHAR",
            "source_id": "VARCHAR",
            "chunk_index": "INT64",
            "text": "VARCHAR",
            "metadata": "JSON",
            vector_field: vector_type,
        }
        problems = []
        for name, kind in expected.items():
            if name not in self.fields:
                problems.append(f"{where} has no field {name!r} ({kind}) that the store writes")
            elif self.fields[name][0] != kind:
                problems.append(f"{where} field {name!r} is {self.fields[name][0]}, the store writes {kind}")
        if "id" in self.fields and not self.fields["id"][2]:
            problems.append(f"{where} field 'id' is not the primary key, so upserts would duplicate rows")
        if self.model_id is None:
            problems.append(
                f"{where} records no embedding model, so it was not created by rag-pipeline; "
                "use another collection name, or drop this collection to rebuild it"
            )
        stored_dimension = self.dimension(vector_field)
        if stored_dimension is not None and stored_dimension != dimension:
            problems.append(
                f"{where} stores {stored_dimension}-d vectors from model {self.model_id or 'unknown'}; the spec's "
                f"embedder makes {dimension}-d vectors with model {model_id}. Use a new collection name "
                "(or drop this one to rebuild it with the new model)"
            )
        elif self.model_id is not None and self.model_id != model_id:
            problems.append(
                f"{where} stores vectors from model {self.model_id}; the spec's embedder is {model_id}. "
                "Vectors from different models are not comparable: use a new collection name "
                "(or drop this one to rebuild it with the new model)"
            )
        if self.metric is not None and self.metric != metric:
            problems.append(f"{where} indexes {vector_field!r} with metric {self.metric}; the spec says {metric}")
        return problems
