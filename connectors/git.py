"""Files of a Git repository at a branch, tag or commit, as a source of documents.

``repo`` is a local repository (a working copy or a bare one, relative paths resolved against the
spec's folder) or a URL (``https://``, ``ssh://``, ``git://``, ``file://``, ``user@host:path``).
A URL is mirrored into ``cache_dir`` once (``git clone --mirror``) and fetched before each
listing, so a re-index transfers only new objects. Files are read from Git's object store at the
resolved commit, never from a working tree: uncommitted edits are not indexed, and no checkout,
hook or filter runs.

Listing is one streamed ``git ls-tree`` of the commit. Each file's change signal is its blob hash,
which changes exactly when its bytes change: an unchanged file is skipped whatever else the
commit changed, a renamed file becomes a new source id (and the old one is removed), and nothing
is read but the blobs of changed files. Symlinks and submodules are skipped. The commit a file
was read at is in its metadata (``commit``), with the ``ref`` that named it.

Credentials: an https URL may carry a user and token (``https://oauth2:${GITLAB_TOKEN}@host/...``,
the token from the environment). They are taken out of the URL before git sees it and handed to
git through a credential helper that reads them from the child process' environment, so they are
never on a command line, in the mirror's config, in a source id, URI, metadata, log line or error.
SSH keys and git's own credential helpers work as usual.

Uses the ``git`` command-line tool (2.24 or later); nothing to pip-install.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import ConfigDict, Field, field_validator

from connectors._remote import PathFilter, human_size, redact, scrub_url
from connectors.base import GlobPatterns, Namespace, Source, path_id
from connectors.local import FileTooLarge, media_type_for
from core.component import ComponentConfig
from core.secrets import register_secret
from core.types import SourceRef, sha256_hex

log = logging.getLogger("rag_pipeline.source.git")

URL_SCHEMES = ("https", "http", "ssh", "git", "file")
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._~-]+@)?[A-Za-z0-9.-]+:(?!//)[^\s]+$")
_OBJECT_ID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # SHA-1 or SHA-256
_REF = re.compile(r"^[A-Za-z0-9._/@{}^~+-]+$")
SYMLINK_MODE = "120000"
# A credential helper that answers git's "get" with what the child process' environment holds.
_CREDENTIAL_HELPER = (
    '!f() { test "$1" = get && printf "username=%s\\npassword=%s\\n" "$RAG_GIT_USERNAME" "$RAG_GIT_PASSWORD"; }; f'
)


class GitError(OSError):
    """A git command that failed; the message has git's own explanation, with credentials removed."""


def _is_url(repo: str) -> bool:
    return "://" in repo or bool(_SCP_LIKE.match(repo)) and not Path(repo).exists()


class GitSource(Source):
    """Files of a Git repository (local path or URL) at ``ref``; blob hashes as change signals."""

    type_name = "git"

    class Config(ComponentConfig):
        # A rejected value is never echoed back in the error: it may hold a token.
        model_config = ConfigDict(hide_input_in_errors=True)

        repo: str = Field(
            min_length=1,
            description="local repository path, or URL (https://, ssh://, git://, file://, user@host:path)",
        )
        ref: str = Field("HEAD", description="branch, tag or commit to index")
        include: GlobPatterns = Field(default_factory=lambda: ["**/*"], description="globs a file's path must match")
        exclude: GlobPatterns = Field(
            default_factory=lambda: [".*"], description="globs that drop a file or directory; default: hidden ones"
        )
        max_file_bytes: int = Field(100 * 2**20, gt=0, description="larger files are listed and fail at read")
        namespace: Namespace = Field(None, description="prefix of every source id; default: the repository's name")
        cache_dir: str | None = Field(
            None, description="where URL repositories are mirrored; default: $XDG_CACHE_HOME/rag-pipeline/git"
        )
        fetch: bool = Field(True, description="fetch a mirrored URL before each listing")
        timeout_s: float = Field(600.0, gt=0, description="longest a clone or fetch may take")

        @field_validator("repo")
        @classmethod
        def _repo_is_safe(cls, value: str) -> str:
            if value.startswith("-"):
                raise ValueError("repo must not start with '-'")
            if "::" in value.split("/", 1)[0]:
                raise ValueError("git remote helpers (transport::address) are not allowed")
            if "://" in value:
                parts = urlsplit(value)
                if parts.scheme.lower() not in URL_SCHEMES:
                    raise ValueError(
                        f"unsupported URL scheme {parts.scheme!r}; expected one of {', '.join(URL_SCHEMES)}"
                    )
                if parts.password and parts.scheme.lower() not in ("http", "https"):
                    raise ValueError("a password in the URL only works for http(s); use an SSH key for ssh:// URLs")
            return value

        @field_validator("ref")
        @classmethod
        def _ref_is_a_name(cls, value: str) -> str:
            if value.startswith("-") or not _REF.match(value):
                raise ValueError(
                    "ref must be a branch, tag or commit name (letters, digits and ._/@{}^~+-, not starting with '-')"
                )
            return value

    config: Config

    # -- identity ------------------------------------------------------------------------------

    @cached_property
    def is_url(self) -> bool:
        return _is_url(self.config.repo)

    @cached_property
    def clean_url(self) -> str:
        """The URL as git sees it: without the user and token of an https URL."""
        return scrub_url(self.config.repo) if self.is_url else self.config.repo

    @property
    def display(self) -> str:
        """How the repository is named in metadata, URIs and messages (never with credentials)."""
        return self.clean_url if self.is_url else Path(os.path.abspath(self.resolve_path(self.config.repo))).as_uri()

    @property
    def namespace(self) -> str:
        if self.config.namespace is not None:
            return self.config.namespace
        tail = self.clean_url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = tail[:-4] if tail.endswith(".git") else tail
        return name or "repo"

    @property
    def scope(self) -> str:
        return f"{self.namespace}/"

    @cached_property
    def _filter(self) -> PathFilter:
        return PathFilter(self.config.include, self.config.exclude)

    @cached_property
    def _secrets(self) -> list[str]:
        parts = urlsplit(self.config.repo) if "://" in self.config.repo else None
        if parts is None or parts.scheme.lower() not in ("http", "https"):
            return []
        return [unquote(s) for s in (parts.password, parts.username) if s]

    def check(self) -> list[str]:
        if shutil.which("git") is None:
            return ["git source: the git command is not installed (apt-get install git)"]
        if not self.is_url:
            path = self.resolve_path(self.config.repo)
            if not path.is_dir():
                return [f"git source: repository folder {path} does not exist"]
        return []

    # -- running git ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GCM_INTERACTIVE": "never", "LC_ALL": "C"}
        secrets = self._credentials()
        if secrets is not None:
            register_secret(*self._secrets)  # git and its helpers may echo them: scrubbed wherever they show up
            count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
            # An empty helper first clears the helpers configured elsewhere, then ours answers.
            for offset, value in enumerate(("", _CREDENTIAL_HELPER)):
                env[f"GIT_CONFIG_KEY_{count + offset}"] = "credential.helper"
                env[f"GIT_CONFIG_VALUE_{count + offset}"] = value
            env["GIT_CONFIG_COUNT"] = str(count + 2)
            env["RAG_GIT_USERNAME"], env["RAG_GIT_PASSWORD"] = secrets
        return env

    def _credentials(self) -> tuple[str, str] | None:
        if not self.is_url or "://" not in self.config.repo:
            return None
        parts = urlsplit(self.config.repo)
        if parts.scheme.lower() not in ("http", "https") or not (parts.username or parts.password):
            return None
        # A token alone in the user part (https://TOKEN@host) is sent as the password, as hosts expect.
        if parts.password is None:
            return "x-access-token", unquote(parts.username or "")
        return unquote(parts.username or ""), unquote(parts.password)

    def _git(self, *args: str, cwd: Path | None = None, timeout: float | None = None, what: str = "") -> str:
        command = ["git", *(["-C", str(cwd)] if cwd is not None else []), *args]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                env=self._environment(),
                timeout=timeout or self.config.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GitError(
                f"{self.display}: {what or args[0]} took longer than timeout_s={self.config.timeout_s:g}"
            ) from None
        except FileNotFoundError:
            raise GitError("the git command is not installed (apt-get install git)") from None
        if done.returncode != 0:
            detail = " ".join(done.stderr.decode("utf-8", errors="replace").split()) or f"exit status {done.returncode}"
            raise GitError(redact(f"{self.display}: {what or args[0]} failed: {detail}", self._secrets))
        return done.stdout.decode("utf-8", errors="surrogateescape")

    # -- the repository --------------------------------------------------------------------------

    def repository(self) -> Path:
        """The local repository to read: the configured folder, or the synced mirror of the URL."""
        if not self.is_url:
            path = self.resolve_path(self.config.repo)
            if not path.is_dir():
                raise GitError(f"repository folder {path} does not exist")
            return path
        mirror = self._mirror_path()
        with self._locked(mirror):
            if not (mirror / "HEAD").is_file():
                self._clone(mirror)
            elif self.config.fetch:
                self._git("fetch", "--prune", "--quiet", "origin", cwd=mirror, what="fetch")
        return mirror

    def _mirror_path(self) -> Path:
        if self.config.cache_dir is not None:
            folder = self.resolve_path(self.config.cache_dir)
        else:
            folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag-pipeline" / "git"
        return folder / f"{self.namespace}-{sha256_hex(self.clean_url)[:16]}.git"

    @contextmanager
    def _locked(self, mirror: Path) -> Iterator[None]:
        """One clone or fetch at a time per mirror, across processes on this machine."""
        mirror.parent.mkdir(parents=True, exist_ok=True)
        with open(mirror.with_name(mirror.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _clone(self, mirror: Path) -> None:
        # Cloned beside the final place and renamed, so a killed clone never looks like a mirror.
        partial = mirror.with_name(f".{mirror.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        log.info("cloning %s into %s", self.display, mirror)
        try:
            self._git("clone", "--mirror", "--quiet", "--", self.clean_url, str(partial), what="clone")
            partial.rename(mirror)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def resolve_commit(self, repository: Path) -> str:
        return self._git(
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            f"{self.config.ref}^{{commit}}",
            cwd=repository,
            what=f"resolving ref {self.config.ref!r}",
        ).strip()

    # -- listing -------------------------------------------------------------------------------

    def list(self) -> Iterator[SourceRef]:
        repository = self.repository()
        try:
            commit = self.resolve_commit(repository)
        except GitError:
            raise GitError(f"{self.display}: ref {self.config.ref!r} does not name a commit") from None
        command = ["git", "-C", str(repository), "ls-tree", "-r", "-z", "-l", "--full-tree", commit]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._environment())
        assert process.stdout is not None and process.stderr is not None
        try:
            for record in _records(process.stdout):
                ref = self._ref(record, commit)
                if ref is not None:
                    yield ref
            stderr = process.stderr.read()
            if process.wait() != 0:
                detail = " ".join(stderr.decode("utf-8", errors="replace").split())
                raise GitError(redact(f"{self.display}: listing commit {commit} failed: {detail}", self._secrets))
        finally:
            if process.poll() is None:  # the consumer stopped early
                process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()

    def _ref(self, record: bytes, commit: str) -> SourceRef | None:
        header, _, raw_path = record.partition(b"\t")
        mode, kind, blob, size = header.decode("ascii").split()
        relative = raw_path.decode("utf-8", errors="backslashreplace")
        if kind != "blob":
            log.debug("skipping %s: a submodule (%s)", relative, kind)
            return None
        if mode == SYMLINK_MODE:
            log.debug("skipping %s: a symlink", relative)
            return None
        if not self._filter.wants(relative):
            return None
        name = PurePosixPath(relative).name
        metadata: dict[str, Any] = {
            "file_name": name,
            "relative_path": relative,
            "extension": PurePosixPath(name).suffix.lower().lstrip("."),
            "repository": self.display,
            "ref": self.config.ref,
            "commit": commit,
            "blob": blob,
        }
        return SourceRef(
            source_id=f"{self.scope}{path_id(raw_path)}",
            uri=f"git+{self.display}@{commit}#path={quote(relative)}",
            media_type=media_type_for(name),
            size=int(size),
            change_signal=blob,
            metadata=metadata,
        )

    # -- reading -------------------------------------------------------------------------------

    def read(self, ref: SourceRef) -> bytes:
        blob = str(ref.metadata.get("blob", ""))
        if not ref.source_id.startswith(self.scope) or not _OBJECT_ID.match(blob):
            raise ValueError(f"{ref.source_id}: not a file listed by this git source")
        limit = self.config.max_file_bytes
        if ref.size > limit:
            raise FileTooLarge(f"file is {human_size(ref.size)}, over max_file_bytes={limit} ({human_size(limit)})")
        repository = self.repository() if not self.is_url else self._mirror_path()
        command = ["git", "-C", str(repository), "cat-file", "blob", blob]
        done = subprocess.run(
            command, capture_output=True, env=self._environment(), timeout=self.config.timeout_s, check=False
        )
        if done.returncode != 0:
            detail = " ".join(done.stderr.decode("utf-8", errors="replace").split())
            raise GitError(redact(f"blob {blob} cannot be read: {detail}", self._secrets))
        return done.stdout


def _records(stream: Any, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """NUL-terminated records from a byte stream, without reading it all."""
    pending = b""
    while chunk := stream.read(chunk_size):
        pending += chunk
        *complete, pending = pending.split(b"\0")
        yield from (r for r in complete if r)
    if pending:
        yield pending
