"""The conventions of mainstream embedding model families, looked up by hub id or local folder.

Each family embeds well only when its conventions are followed, and nothing in the weights says
what they are: E5 wants ``"query: "`` / ``"passage: "`` prefixes, BGE's English models an
instruction on queries, Instructor an instruction it leaves out of the pooling, Qwen3-Embedding the
vector of an appended end-of-text token, GritLM bidirectional attention... Get one wrong and
retrieval quality drops silently. A :class:`ModelFamily` writes them down once; the Hugging Face
embedder takes its defaults from the family its model belongs to, and a spec can still override
every field.

Which family a model belongs to (:meth:`ModelCatalog.identify`):

1. a hub id (``BAAI/bge-small-en-v1.5``) is matched against each family's ``hub_ids`` patterns
   (shell-style, case-insensitive);
2. a local folder is identified by its path: a Hugging Face cache folder
   (``models--BAAI--bge-small-en-v1.5/snapshots/<hash>``), an ``owner/name`` pair of folders
   (``models/BAAI/bge-small-en-v1.5``), or the folder's own name (``bge-small-en-v1.5``);
   failing that, by the hub id recorded in its ``config.json`` (``_name_or_path``), which
   fine-tuning scripts keep from the model they started from.

User families (:func:`register_family`, or the entry-point group ``rag_pipeline.embedding_families``)
are checked before the built-in ones, so a user can refine a built-in family for some models.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, get_args

from core.errors import PipelineError
from core.language import LATIN, MULTILINGUAL
from core.models import Pooling

log = logging.getLogger("rag_pipeline.embed")

ENTRY_POINT_GROUP = "rag_pipeline.embedding_families"

# The instruction most instruction-tuned retrievers were evaluated with on BEIR (E5-mistral's web
# search one); queries of other tasks deserve their own, set through query_prefix.
WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Language sets of ModelFamily.languages (codes of core.language).
ENGLISH = ("en",)
ANY_LANGUAGE = (MULTILINGUAL,)
EVERY_MODEL = "*/*"  # a pattern every model name fits


class CatalogError(PipelineError):
    """An unknown family name, a malformed family, or a plugin that registers one badly."""


@dataclass(frozen=True)
class ModelFamily:
    """How the models of one family turn text into vectors.

    Every field is a default: a spec may override it, and a model folder's sentence-transformers
    files (pooling, normalisation, max_seq_length, prompts) take precedence over it.
    """

    name: str
    hub_ids: tuple[str, ...]  # shell-style patterns of "owner/name", matched case-insensitively
    pooling: Pooling
    normalize: bool = True
    query_prefix: str = ""  # prepended to queries: a prefix or a whole instruction
    document_prefix: str = ""
    max_length: int | None = None  # tokens the model was trained on; None: the model's own limit
    pool_prefix_tokens: bool = True  # False: prefix tokens (and leading specials) are left out of mean pooling
    bidirectional_attention: bool = False  # decoder run with full attention (GritLM, gte-Qwen2)
    end_token: str | None = None  # token every input must end with (last-token pooling reads its state)
    matryoshka_min_dim: int | None = None  # trained for truncation to any size from this one up; None: not
    matryoshka_layer_norm: bool = False  # layer-normalise before truncating (nomic-embed v1.5)
    query_task: str | None = None  # task adapter for queries (jina-embeddings-v3 LoRA)
    document_task: str | None = None
    trust_remote_code: bool = False  # the weights need code shipped with them
    reference: str = ""  # where the conventions are documented
    # The languages the family's models were trained for, as (hub-id pattern, language codes of
    # core.language) pairs, first fitting pattern wins: one family's conventions can span models of
    # one language and multilingual ones (e5-base-v2, multilingual-e5-base). A model no pattern
    # fits makes no claim, and no warning is given for it.
    languages: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not self.name.strip():
            problems.append("a family needs a name")
        if not self.hub_ids or any("/" not in p for p in self.hub_ids):
            problems.append("hub_ids must be patterns of 'owner/name', e.g. 'BAAI/bge-*-en-v1.5'")
        if self.pooling not in get_args(Pooling):
            problems.append(f"pooling {self.pooling!r} is not one of {', '.join(get_args(Pooling))}")
        if self.max_length is not None and self.max_length < 2:
            problems.append("max_length must be at least 2")
        if self.matryoshka_min_dim is not None and self.matryoshka_min_dim < 1:
            problems.append("matryoshka_min_dim must be positive")
        if any("/" not in pattern or not codes for pattern, codes in self.languages):
            problems.append("languages must pair patterns of 'owner/name' with language codes, e.g. ('*/*', ('en',))")
        if problems:
            raise CatalogError(f"embedding family {self.name!r}: {'; '.join(problems)}")

    def matches(self, name: str) -> bool:
        """True when ``name`` ("owner/name", or a bare folder name) fits one of the patterns."""
        return any(_fits(pattern, name) for pattern in self.hub_ids)

    def languages_of(self, name: str) -> frozenset[str] | None:
        """The languages the model named ``name`` was trained for; None when the family makes no claim for it."""
        return next((frozenset(codes) for pattern, codes in self.languages if _fits(pattern, name)), None)

    def conventions(self) -> dict[str, Any]:
        """The convention fields, by name (everything but the identity, documentation and language fields)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("name", "hub_ids", "reference", "languages")
        }


def _fits(pattern: str, name: str) -> bool:
    """Whether ``name`` ("owner/name", or a bare folder name, matched against the pattern's name part)
    fits the shell-style ``pattern``, case-insensitively."""
    lowered, pattern = name.lower(), pattern.lower()
    return fnmatch.fnmatchcase(lowered, pattern if "/" in lowered else pattern.split("/", 1)[1])


def _instruction(task: str, query_label: str = "Query: ") -> str:
    return f"Instruct: {task}\n{query_label}"


BUILTIN_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "bge-en",
        ("BAAI/bge-*-en-v1.5", "BAAI/bge-*-en"),
        "cls",
        query_prefix="Represent this sentence for searching relevant passages: ",
        max_length=512,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/BAAI/bge-large-en-v1.5",
    ),
    ModelFamily(
        "bge-zh",
        ("BAAI/bge-*-zh-v1.5", "BAAI/bge-*-zh"),
        "cls",
        query_prefix="为这个句子生成表示以用于检索相关文章：",
        max_length=512,
        languages=((EVERY_MODEL, ("zh",)),),
        reference="https://huggingface.co/BAAI/bge-large-zh-v1.5",
    ),
    ModelFamily(
        "bge-m3",
        ("BAAI/bge-m3",),
        "cls",
        max_length=8192,
        languages=((EVERY_MODEL, ANY_LANGUAGE),),
        reference="https://huggingface.co/BAAI/bge-m3",
    ),
    ModelFamily(
        "gte-qwen",
        ("Alibaba-NLP/gte-Qwen2-*-instruct", "Alibaba-NLP/gte-Qwen1.5-*-instruct"),
        "last",
        query_prefix=_instruction(WEB_SEARCH_TASK),
        max_length=32768,
        bidirectional_attention=True,
        end_token="<|endoftext|>",
        languages=((EVERY_MODEL, ANY_LANGUAGE),),
        reference="https://huggingface.co/Alibaba-NLP/gte-Qwen2-7B-instruct",
    ),
    ModelFamily(
        "gte-v1.5",
        ("Alibaba-NLP/gte-*-en-v1.5", "Alibaba-NLP/gte-multilingual-base"),
        "cls",
        max_length=8192,
        trust_remote_code=True,
        languages=(("Alibaba-NLP/gte-multilingual-base", ANY_LANGUAGE), ("Alibaba-NLP/gte-*-en-v1.5", ENGLISH)),
        reference="https://huggingface.co/Alibaba-NLP/gte-large-en-v1.5",
    ),
    ModelFamily(
        "gte",
        ("thenlper/gte-*",),
        "mean",
        max_length=512,
        languages=(("thenlper/gte-*-zh", ("zh",)), ("thenlper/gte-*", ENGLISH)),
        reference="https://huggingface.co/thenlper/gte-large",
    ),
    ModelFamily(
        "e5-mistral",
        ("intfloat/e5-mistral-7b-instruct",),
        "last",
        query_prefix=_instruction(WEB_SEARCH_TASK),
        max_length=4096,
        end_token="</s>",
        languages=((EVERY_MODEL, ENGLISH),),  # "we recommend using this model for English only"
        reference="https://huggingface.co/intfloat/e5-mistral-7b-instruct",
    ),
    ModelFamily(
        "multilingual-e5-instruct",
        ("intfloat/multilingual-e5-*-instruct",),
        "mean",
        query_prefix=_instruction(WEB_SEARCH_TASK),
        max_length=512,
        languages=((EVERY_MODEL, ANY_LANGUAGE),),
        reference="https://huggingface.co/intfloat/multilingual-e5-large-instruct",
    ),
    ModelFamily(
        "e5",
        ("intfloat/e5-*", "intfloat/multilingual-e5-*"),
        "mean",
        query_prefix="query: ",
        document_prefix="passage: ",
        max_length=512,
        languages=(("intfloat/multilingual-e5-*", ANY_LANGUAGE), ("intfloat/e5-*", ENGLISH)),
        reference="https://huggingface.co/intfloat/e5-large-v2",
    ),
    ModelFamily(
        "m3e",
        ("moka-ai/m3e-*",),
        "mean",
        max_length=512,
        languages=((EVERY_MODEL, ("zh", "en")),),
        reference="https://huggingface.co/moka-ai/m3e-base",
    ),
    ModelFamily(
        "instructor",
        ("hkunlp/instructor-*",),
        "mean",
        query_prefix="Represent the Wikipedia question for retrieving supporting documents: ",
        document_prefix="Represent the Wikipedia document for retrieval: ",
        max_length=512,
        pool_prefix_tokens=False,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/hkunlp/instructor-large",
    ),
    ModelFamily(
        "qwen3-embedding",
        ("Qwen/Qwen3-Embedding-*",),
        "last",
        # "Query:" without a trailing space, exactly as the model card's get_detailed_instruct.
        query_prefix=_instruction(WEB_SEARCH_TASK, "Query:"),
        max_length=32768,
        end_token="<|endoftext|>",
        matryoshka_min_dim=32,
        languages=((EVERY_MODEL, ANY_LANGUAGE),),
        reference="https://huggingface.co/Qwen/Qwen3-Embedding-0.6B",
    ),
    ModelFamily(
        "gritlm",
        ("GritLM/GritLM-*",),
        "mean",
        query_prefix=f"<|user|>\n{WEB_SEARCH_TASK}\n<|embed|>\n",
        document_prefix="<|embed|>\n",
        max_length=4096,
        pool_prefix_tokens=False,
        bidirectional_attention=True,
        reference="https://github.com/ContextualAI/gritlm",
    ),
    ModelFamily(
        "jina-v2",
        ("jinaai/jina-embeddings-v2-*",),
        "mean",
        max_length=8192,
        trust_remote_code=True,
        languages=(
            ("jinaai/jina-embeddings-v2-*-en", ENGLISH),
            ("jinaai/jina-embeddings-v2-*-zh", ("zh", "en")),
            ("jinaai/jina-embeddings-v2-*-de", ("en", LATIN)),  # German and English
            ("jinaai/jina-embeddings-v2-*-es", ("en", LATIN)),  # Spanish and English
        ),
        reference="https://huggingface.co/jinaai/jina-embeddings-v2-base-en",
    ),
    ModelFamily(
        "jina-v3",
        ("jinaai/jina-embeddings-v3",),
        "mean",
        query_prefix="Represent the query for retrieving evidence documents: ",
        document_prefix="Represent the document for retrieval: ",
        max_length=8192,
        matryoshka_min_dim=32,
        query_task="retrieval.query",
        document_task="retrieval.passage",
        trust_remote_code=True,
        languages=((EVERY_MODEL, ANY_LANGUAGE),),
        reference="https://huggingface.co/jinaai/jina-embeddings-v3",
    ),
    ModelFamily(
        "mxbai-embed-large",
        ("mixedbread-ai/mxbai-embed-large-v1",),
        "cls",
        query_prefix="Represent this sentence for searching relevant passages: ",
        max_length=512,
        matryoshka_min_dim=128,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/mixedbread-ai/mxbai-embed-large-v1",
    ),
    ModelFamily(
        "nomic-embed-v1.5",
        ("nomic-ai/nomic-embed-text-v1.5",),
        "mean",
        query_prefix="search_query: ",
        document_prefix="search_document: ",
        max_length=8192,
        matryoshka_min_dim=64,
        matryoshka_layer_norm=True,
        trust_remote_code=True,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/nomic-ai/nomic-embed-text-v1.5",
    ),
    ModelFamily(
        "nomic-embed",
        ("nomic-ai/nomic-embed-text-v1",),
        "mean",
        query_prefix="search_query: ",
        document_prefix="search_document: ",
        max_length=8192,
        trust_remote_code=True,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/nomic-ai/nomic-embed-text-v1",
    ),
    ModelFamily(
        "all-minilm",
        ("sentence-transformers/all-MiniLM-*",),
        "mean",
        max_length=256,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    ),
    ModelFamily(
        "all-mpnet",
        ("sentence-transformers/all-mpnet-base-*",),
        "mean",
        max_length=384,
        languages=((EVERY_MODEL, ENGLISH),),
        reference="https://huggingface.co/sentence-transformers/all-mpnet-base-v2",
    ),
)


def hub_id_candidates(folder: Path) -> list[str]:
    """Names a local model folder goes by, most telling first (see the module docstring)."""
    candidates: list[str] = []
    for part in folder.parts:
        if part.startswith("models--") and part.count("--") >= 2:  # Hugging Face cache layout
            owner, _, name = part[len("models--") :].partition("--")
            candidates.append(f"{owner}/{name}")
    candidates.append(f"{folder.parent.name}/{folder.name}")
    candidates.append(folder.name)
    recorded = _recorded_hub_id(folder)
    if recorded:
        candidates.append(recorded)
    return candidates


def _recorded_hub_id(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and _HUB_ID.match(name) else None


FamilySource = ModelFamily | Iterable[ModelFamily] | Callable[[], "ModelFamily | Iterable[ModelFamily]"]


class ModelCatalog:
    """Families by name, matched against model names; user families first, then built-in ones."""

    def __init__(
        self, builtin: Iterable[ModelFamily] = BUILTIN_FAMILIES, *, entry_point_group: str | None = ENTRY_POINT_GROUP
    ):
        self._builtin = list(builtin)
        self._registered: list[ModelFamily] = []
        self._entry_point_group = entry_point_group
        self._plugins_loaded = entry_point_group is None
        self._lock = threading.RLock()

    def register(self, family: ModelFamily, *, replace: bool = False) -> None:
        """Add ``family``; it is matched before every family registered earlier and every built-in one."""
        if not isinstance(family, ModelFamily):
            raise CatalogError(f"register() takes a ModelFamily, not {type(family).__name__}")
        with self._lock:
            existing = [f for f in self._registered if f.name == family.name]
            if existing and not replace:
                raise CatalogError(
                    f"embedding family {family.name!r} is already registered; pass replace=True to redefine it"
                )
            self._registered = [family] + [f for f in self._registered if f.name != family.name]

    def unregister(self, name: str) -> None:
        with self._lock:
            self._registered = [f for f in self._registered if f.name != name]

    def families(self) -> list[ModelFamily]:
        """Every family in match order: registered (newest first), then built-in."""
        self._load_plugins()
        with self._lock:
            return self._registered + [f for f in self._builtin if f.name not in {r.name for r in self._registered}]

    def get(self, name: str) -> ModelFamily:
        for family in self.families():
            if family.name == name:
                return family
        raise CatalogError(
            f"unknown embedding family {name!r}; known: {', '.join(sorted(f.name for f in self.families()))}"
        )

    def match(self, name: str) -> ModelFamily | None:
        """The first family whose patterns fit ``name`` ("owner/name" or a bare folder name)."""
        return next((family for family in self.families() if family.matches(name)), None)

    def identify(self, model: str, location: str) -> ModelFamily | None:
        """The family of a model named ``model`` in the spec, found at ``location`` (folder or hub id)."""
        folder = Path(location)
        names = hub_id_candidates(folder) if folder.is_dir() else [model]
        for name in names:
            family = self.match(name)
            if family is not None:
                return family
        return None

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        with self._lock:
            if self._plugins_loaded:
                return
            self._plugins_loaded = True  # set first: a failing plugin is reported once, not on every lookup
            for entry_point in entry_points(group=self._entry_point_group or ""):
                try:
                    for family in _families_from(entry_point.load()):
                        self.register(family, replace=True)
                except Exception as exc:
                    raise CatalogError(
                        f"the embedding-family plugin {entry_point.name!r} ({entry_point.value}, entry-point group "
                        f"{self._entry_point_group}) cannot be loaded: {exc}"
                    ) from exc


def _families_from(source: FamilySource) -> list[ModelFamily]:
    """A plugin's entry point may name a family, an iterable of families, or a function returning either."""
    if callable(source) and not isinstance(source, ModelFamily):
        source = source()
    families = [source] if isinstance(source, ModelFamily) else list(source)
    bad = [type(f).__name__ for f in families if not isinstance(f, ModelFamily)]
    if bad:
        raise CatalogError(f"expected ModelFamily objects, got {', '.join(bad)}")
    return families


CATALOG = ModelCatalog()


def register_family(family: ModelFamily, *, replace: bool = False) -> None:
    """Teach the process-wide catalog a new family (or, with ``replace``, redefine one you registered)."""
    CATALOG.register(family, replace=replace)


def family_named(name: str) -> ModelFamily:
    return CATALOG.get(name)


def find_family(model: str, location: str | None = None) -> ModelFamily | None:
    """The family of ``model`` (a hub id, or a folder at ``location``), or None when no family fits."""
    return CATALOG.identify(model, location or model)


# -- effective conventions: spec over model files over family over generic defaults ---------------

SPEC, MODEL_FILES, FAMILY, DEFAULT = "spec", "model files", "family", "default"

# Convention fields that only shape query vectors: changing them never calls for re-embedding documents.
QUERY_SIDE = ("query_prefix", "query_task")


@dataclass(frozen=True)
class Conventions:
    """The conventions an embedder applies, and where each one came from (``sources``)."""

    pooling: Pooling = "mean"
    normalize: bool = True
    max_length: int | None = None  # trained length; None: the model's own limit
    query_prefix: str = ""
    document_prefix: str = ""
    pool_prefix_tokens: bool = True
    bidirectional_attention: bool = False
    end_token: str | None = None
    matryoshka_layer_norm: bool = False
    query_task: str | None = None
    document_task: str | None = None
    family: str | None = None
    sources: dict[str, str] | None = None  # field -> SPEC, MODEL_FILES, FAMILY or DEFAULT

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("family", "sources"))

    def document_side(self) -> dict[str, Any]:
        """The conventions that change document vectors (every field but the query-side ones)."""
        return {name: getattr(self, name) for name in self.names() if name not in QUERY_SIDE}

    def source(self, name: str) -> str:
        return (self.sources or {}).get(name, DEFAULT)


def _model_file_values(settings: Any) -> dict[str, Any]:
    """What a folder's sentence-transformers files say (``SentenceTransformersSettings``), by convention name."""
    values: dict[str, Any] = {}
    if settings.pooling is not None:
        values["pooling"] = settings.pooling
    if settings.normalize is not None:
        values["normalize"] = settings.normalize
    if settings.max_seq_length is not None:
        values["max_length"] = settings.max_seq_length
    if settings.include_prompt is not None:
        values["pool_prefix_tokens"] = settings.include_prompt
    prompts = settings.prompts
    if "query" in prompts:
        values["query_prefix"] = prompts["query"]
    for name in ("document", "passage"):
        if name in prompts:
            values["document_prefix"] = prompts[name]
            break
    return values


# Optional text conventions a spec switches off with an empty string.
_EMPTY_MEANS_NONE = ("end_token", "query_task", "document_task")


def resolve_conventions(family: ModelFamily | None, model_files: Any, overrides: dict[str, Any]) -> Conventions:
    """Each convention from the first source that sets it: ``overrides`` (the spec), the model's
    sentence-transformers files, the ``family``, the generic default."""
    layers = [
        (SPEC, {k: v for k, v in overrides.items() if v is not None}),
        (MODEL_FILES, _model_file_values(model_files)),
        (FAMILY, family.conventions() if family else {}),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Conventions.names():
        for source, layer in layers:
            if name in layer:
                value = layer[name]
                values[name] = None if name in _EMPTY_MEANS_NONE and value == "" else value
                sources[name] = source
                break
    return Conventions(**values, family=family.name if family else None, sources=sources)
