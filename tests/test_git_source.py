"""The git source against real repositories made by the tests: a working copy, a bare repository
reached by file:// URL, and one served over HTTP by ``git http-backend`` behind Basic auth (to
prove that a token in the URL works and is never stored, logged or shown)."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from connectors.git import GitError, GitSource
from connectors.local import FileTooLarge
from core.records import MemoryRecords
from pipeline import Pipeline
from tests.plugins.components import PLUGINS

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the git command is not installed")

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}
TOKEN = "glpat-Secr3tTok3n-never-print-me"


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def commit(work: Path, message: str, files: dict[str, str | None]) -> str:
    for name, text in files.items():
        path = work / name
        if text is None:
            git(work, "rm", "-q", "--", name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        git(work, "add", "--", name)
    git(work, "commit", "-q", "-m", message)
    return git(work, "rev-parse", "HEAD")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "handbook"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    commit(
        work,
        "first",
        {
            "guide.md": "# Guide\n\nFace the hive entrance south-east.\n",
            "notes/compost.txt": "Turn the compost heap every two weeks.\n",
            "odd name é 'q'.txt": "Names with spaces, accents and quotes survive.\n",
            ".github/ci.yml": "hidden: excluded by default\n",
        },
    )
    (work / "link.md").symlink_to("guide.md")
    git(work, "add", "link.md")
    git(work, "commit", "-q", "-m", "a symlink")
    return work


def pipeline_for(repo: str, tmp_path: Path, **settings) -> Pipeline:
    spec = {
        "version": 1,
        "name": "git-test",
        "stages": {
            "source": {"type": "git", "repo": repo, "cache_dir": str(tmp_path / "mirrors"), **settings},
            "parser": {"type": "unstructured"},
            "chunker": {"type": "recursive", "chunk_size": 400, "chunk_overlap": 0},
            "embedder": {"type": "tests.plugins.components:HashEmbedder"},  # plumbing: the test is about the source
            "store": {"type": "tests.plugins.components:MemoryStore"},
        },
        "runner": {"parse_workers": 0, "progress": "never", "failures_file": ""},
    }
    return Pipeline(spec, allowed_modules=PLUGINS)


def texts(pipeline: Pipeline) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for row in pipeline.store.table.values():
        out.setdefault(row["source_id"], []).append(row["text"])
    return {k: " ".join(v) for k, v in out.items()}


def test_reindex_cycle_edit_delete_rename(work, tmp_path):
    pipeline, records = pipeline_for(str(work), tmp_path), MemoryRecords()
    first = pipeline.reindex(records=records)
    ids = {"handbook/guide.md", "handbook/notes/compost.txt", "handbook/odd name é 'q'.txt"}
    assert first.changes.added == 3 and set(texts(pipeline)) == ids  # no hidden file, no symlink
    assert "south-east" in texts(pipeline)["handbook/guide.md"]
    head = git(work, "rev-parse", "HEAD")
    refs = {r.source_id: r for r in pipeline.sources[0].list()}
    blob = git(work, "rev-parse", "HEAD:guide.md")
    assert refs["handbook/guide.md"].change_signal == blob == refs["handbook/guide.md"].metadata["blob"]
    assert refs["handbook/guide.md"].metadata["commit"] == head and refs["handbook/guide.md"].metadata["ref"] == "HEAD"

    (work / "guide.md").write_text("uncommitted edits are not indexed\n")
    unchanged = pipeline.reindex(records=records)
    assert (unchanged.changes.unchanged, unchanged.documents_seen) == (3, 0)  # nothing read: blob hashes equal

    git(work, "checkout", "-q", "--", "guide.md")
    commit(work, "edit", {"notes/compost.txt": "Turn the compost heap weekly in summer.\n"})
    edited = pipeline.reindex(records=records)
    assert (edited.changes.updated, edited.changes.unchanged, edited.documents_seen) == (1, 2, 1)
    assert "weekly in summer" in texts(pipeline)["handbook/notes/compost.txt"]

    commit(work, "delete", {"odd name é 'q'.txt": None})
    deleted = pipeline.reindex(records=records)
    assert deleted.changes.deleted == 1 and "handbook/odd name é 'q'.txt" not in texts(pipeline)

    git(work, "mv", "guide.md", "beekeeping.md")
    git(work, "commit", "-q", "-m", "rename")
    renamed = pipeline.reindex(records=records)
    assert (renamed.changes.added, renamed.changes.deleted) == (1, 1)
    assert set(texts(pipeline)) == {"handbook/beekeeping.md", "handbook/notes/compost.txt"}
    assert set(records.records) == {"handbook/beekeeping.md", "handbook/notes/compost.txt"}


def test_branch_tag_and_commit_refs(work):
    first = git(work, "rev-parse", "HEAD")
    git(work, "tag", "v1")
    git(work, "checkout", "-q", "-b", "draft")
    commit(work, "draft", {"draft.md": "Work in progress.\n"})
    git(work, "checkout", "-q", "main")

    def listed(ref: str) -> set[str]:
        return {r.metadata["relative_path"] for r in GitSource(repo=str(work), ref=ref).list()}

    assert "draft.md" in listed("draft") and "draft.md" not in listed("v1") and "draft.md" not in listed(first)
    assert {r.metadata["commit"] for r in GitSource(repo=str(work), ref="v1").list()} == {first}
    with pytest.raises(GitError, match="'no-such-branch' does not name a commit"):
        list(GitSource(repo=str(work), ref="no-such-branch").list())


def test_url_is_mirrored_and_fetched(work, tmp_path):
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(remote))
    source = GitSource(repo=remote.as_uri(), cache_dir=str(tmp_path / "mirrors"))
    assert source.namespace == "remote" and source.scope == "remote/"
    before = {r.metadata["relative_path"]: r for r in source.list()}
    assert set(before) == {"guide.md", "notes/compost.txt", "odd name é 'q'.txt"}
    assert source.read(before["guide.md"]).startswith(b"# Guide")

    commit(work, "more", {"new.md": "A page added upstream.\n"})
    git(work, "push", "-q", str(remote), "main")
    after = {r.metadata["relative_path"] for r in source.list()}  # fetched before listing
    assert "new.md" in after
    [mirror] = [p for p in (tmp_path / "mirrors").iterdir() if p.suffix == ".git"]
    assert git(mirror, "config", "remote.origin.url") == remote.as_uri()


def test_size_cap_and_foreign_refs(work):
    source = GitSource(repo=str(work), max_file_bytes=10)
    refs = {r.metadata["relative_path"]: r for r in source.list()}
    with pytest.raises(FileTooLarge, match="max_file_bytes=10"):
        source.read(refs["guide.md"])
    other = GitSource(repo=str(work), namespace="other")
    with pytest.raises(ValueError, match="not a file listed by this git source"):
        other.read(refs["guide.md"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"repo": "--upload-pack=touch /tmp/pwned"}, "must not start with '-'"),
        ({"repo": "ext::sh -c touch% /tmp/pwned"}, "remote helpers"),
        ({"repo": "ftp://example.com/repo.git"}, "unsupported URL scheme"),
        ({"repo": "ssh://git:pw@example.com/repo.git"}, "only works for http"),
        ({"repo": "/srv/repo", "ref": "--output=/tmp/x"}, "ref must be"),
        ({"repo": "/srv/repo", "ref": "main; rm -rf /"}, "ref must be"),
    ],
)
def test_dangerous_settings_are_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        GitSource(**settings)


def test_check_reports_problems_without_running_git(tmp_path, monkeypatch):
    assert "does not exist" in GitSource(repo=str(tmp_path / "nowhere")).check()[0]
    assert GitSource(repo="https://example.com/org/repo.git").check() == []
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "git command is not installed" in GitSource(repo=str(tmp_path)).check()[0]


# -- credentials over HTTP ---------------------------------------------------------------------------


@pytest.fixture
def git_http(work, tmp_path) -> Iterator[tuple[str, list[str]]]:
    """``git http-backend`` behind Basic auth (user ``oauth2``, password TOKEN); yields (URL,
    Authorization headers seen)."""
    root = tmp_path / "served"
    root.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(work), str(root / "handbook.git"))
    expected = "Basic " + base64.b64encode(f"oauth2:{TOKEN}".encode()).decode()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

        def do_GET(self) -> None:
            self.serve()

        def do_POST(self) -> None:
            self.serve()

        def serve(self) -> None:
            authorization = self.headers.get("Authorization", "")
            seen.append(authorization)
            if authorization != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REMOTE_USER": "oauth2",
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                "HTTP_GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_PROTOCOL": "HTTP/1.0",
                "REMOTE_ADDR": "127.0.0.1",
            }
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            headers = [line.split(":", 1) for line in head.decode("latin-1").splitlines() if ":" in line]
            status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
            self.send_response(status)
            for name, value in headers:
                if name.lower() != "status":
                    self.send_header(name, value.strip())
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="git-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/handbook.git", seen
    server.shutdown()
    server.server_close()


def test_token_in_url_authenticates_and_is_never_stored_logged_or_shown(git_http, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    url, seen = git_http
    with_token = url.replace("http://", f"http://oauth2:{TOKEN}@")
    source = GitSource(repo=with_token, cache_dir=str(tmp_path / "mirrors"))
    refs = list(source.list())
    assert {r.metadata["relative_path"] for r in refs} == {"guide.md", "notes/compost.txt", "odd name é 'q'.txt"}
    assert seen and seen[-1].startswith("Basic ")  # the helper answered git's 401 with our credentials
    assert source.read(refs[0])
    mirror_files = "".join(
        p.read_text(errors="replace")
        for p in (tmp_path / "mirrors").rglob("*")
        if p.is_file() and p.stat().st_size < 1_000_000
    )
    shown = (
        [repr(r) for r in refs]
        + [source.display, source.scope, mirror_files]
        + [r.getMessage() for r in caplog.records]
    )
    assert not any(TOKEN in text for text in shown)
    assert refs[0].metadata["repository"] == url

    wrong = GitSource(
        repo=url.replace("http://", "http://oauth2:wrong-Secr3t-value@"), cache_dir=str(tmp_path / "other")
    )
    with pytest.raises(GitError) as failed:
        list(wrong.list())
    assert "wrong-Secr3t-value" not in str(failed.value) and "clone failed" in str(failed.value)
    unreachable = GitSource(repo=f"https://user:{TOKEN}@127.0.0.1:1/x.git", cache_dir=str(tmp_path / "x"), timeout_s=20)
    with pytest.raises(GitError) as refused:
        list(unreachable.list())
    assert TOKEN not in str(refused.value) and "127.0.0.1:1/x.git" in str(refused.value)
    with pytest.raises(ValueError) as spec_error:
        GitSource(repo=f"ssh://git:{TOKEN}@example.com/x.git")
    assert TOKEN not in str(spec_error.value)
