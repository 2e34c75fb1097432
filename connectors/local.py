"""A folder on the local file system as a source of documents.

Listing walks the tree one directory at a time (entries sorted by name, so the order is the same
on every run and machine) and never holds more than the directories on the current path. Files
that cannot be indexed are still listed, so that the run records them as failures with a reason
instead of dropping them without a word: a symlink that leads out of the folder, a file over the
size limit, a file that cannot be opened, a directory that cannot be listed, a named pipe.

Include and exclude patterns (matched case-sensitively, ``/`` as separator):

* a pattern without ``/`` matches the file or directory *name* at any depth
  (``*.md``, ``.*``, ``node_modules``), like a ``.gitignore`` line;
* a pattern with ``/`` matches the path relative to the folder; ``**`` spans any number of
  directories (``docs/**/*.md``, ``**/drafts/**``), ``*`` and ``?`` stay within one name.

An excluded directory is not entered at all. The default excludes hidden files and directories
(``.git``, ``.venv``, ``.DS_Store`` ...). A directory symlink that leads out of the folder is
listed once, as itself, whatever the include patterns, so that the refusal shows up in the run.

Source ids are ``<namespace>/<relative path>``; the namespace defaults to the folder's name, so
two sources over folders with the same name need distinct ``namespace`` settings.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from urllib.parse import unquote_to_bytes

from pydantic import Field

from connectors.base import GlobPatterns, Namespace, Source, path_id
from core.component import ComponentConfig
from core.types import SourceRef

log = logging.getLogger("rag_pipeline.source.local")

# Our own table first: mimetypes reads the machine's /etc/mime.types, so on its own it would give
# different media types (and so different parser routing) on different machines.
MEDIA_TYPES: dict[str, str] = {
    "txt": "text/plain",
    "text": "text/plain",
    "log": "text/plain",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "rst": "text/x-rst",
    "org": "text/org",
    "html": "text/html",
    "htm": "text/html",
    "xml": "application/xml",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "jsonl": "application/x-ndjson",
    "yaml": "application/yaml",
    "yml": "application/yaml",
    "eml": "message/rfc822",
    "msg": "application/vnd.ms-outlook",
    "p7s": "application/pkcs7-signature",
    "epub": "application/epub+zip",
    "pdf": "application/pdf",
    "rtf": "text/rtf",
    "odt": "application/vnd.oasis.opendocument.text",
    "doc": "application/msword",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "ppt": "application/vnd.ms-powerpoint",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "xls": "application/vnd.ms-excel",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
    "heic": "image/heic",
    "zip": "application/zip",
}
UNKNOWN_MEDIA_TYPE = "application/octet-stream"
DIRECTORY_MEDIA_TYPE = "inode/directory"


def media_type_for(file_name: str) -> str:
    extension = PurePosixPath(file_name).suffix.lower().lstrip(".")
    if extension in MEDIA_TYPES:
        return MEDIA_TYPES[extension]
    guessed, _ = mimetypes.guess_type(file_name, strict=False)
    return guessed or UNKNOWN_MEDIA_TYPE


# -- read errors: OSError subclasses whose message is the reason the runner records ----------


class SymlinkOutsideRoot(PermissionError):
    """A symlink whose target is outside the source folder (refused: it could expose any file)."""


class FileTooLarge(OSError):
    """A file over ``max_file_bytes``."""


class NotAFile(OSError):
    """A directory that could not be listed, a named pipe, a socket or a device."""


# -- patterns ---------------------------------------------------------------------------------


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate one glob (``**``, ``*``, ``?``, ``[...]``) into a regex over a relative path."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (close := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : close]
            negate = body[:1] in ("!", "^")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            out.append(f"[{'^/' if negate else ''}{body}]")
            i = close + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True)
class PathPattern:
    """An include/exclude glob (``*``, ``**``, ``?``, ``[...]``) matched against paths relative to a source's root."""

    regex: re.Pattern[str]
    by_name: bool  # no "/" in the pattern: match the last path component only
    below: re.Pattern[str] | None  # for "<dir pattern>/**": the directories whose whole content it matches

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        # A trailing "/" (a directory hint in .gitignore) and a leading "/" (anchored at the
        # folder) change nothing here: path patterns are always relative to the folder.
        pattern = text.strip().rstrip("/")
        if "/" not in pattern:
            return cls(_glob_to_regex(pattern), True, None)
        pattern = pattern.lstrip("/")
        below = _glob_to_regex(pattern[:-3]) if pattern.endswith("/**") else None
        return cls(_glob_to_regex(pattern), False, below)

    def matches(self, relative: str) -> bool:
        subject = relative.rsplit("/", 1)[-1] if self.by_name else relative
        return self.regex.fullmatch(subject) is not None

    def matches_directory(self, relative: str) -> bool:
        """True when the pattern matches this directory, or everything below it."""
        return self.matches(relative) or (self.below is not None and self.below.fullmatch(relative) is not None)


# -- the source -------------------------------------------------------------------------------


@dataclass
class _Directory:
    """A directory being walked: its relative path and its remaining sorted entries."""

    relative: str
    entries: Iterator[os.DirEntry[str]]
    identity: tuple[int, int]  # (st_dev, st_ino): guards against symlink loops


class LocalDirectorySource(Source):
    type_name = "local"

    class Config(ComponentConfig):
        path: str = Field(description="the folder to index; relative paths are resolved against the spec's folder")
        include: GlobPatterns = Field(
            default_factory=lambda: ["**/*"], description="globs a file must match (any of them)"
        )
        exclude: GlobPatterns = Field(
            default_factory=lambda: [".*"],
            description="globs that drop a file or a whole directory; default: hidden ones",
        )
        recursive: bool = True
        follow_symlinks: bool = Field(True, description="follow symlinks that stay inside the folder")
        max_file_bytes: int = Field(100 * 2**20, gt=0, description="larger files are listed and fail at read")
        namespace: Namespace = Field(None, description="prefix of every source id; default: the folder's name")

    config: Config

    # -- configuration derived once --------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.resolve_path(self.config.path)

    @property
    def namespace(self) -> str:
        if self.config.namespace is not None:
            return self.config.namespace
        return Path(os.path.abspath(self.root)).name or "root"

    @property
    def scope(self) -> str:
        return f"{self.namespace}/"

    @cached_property
    def _include(self) -> list[PathPattern]:
        return [PathPattern.parse(p) for p in self.config.include]

    @cached_property
    def _exclude(self) -> list[PathPattern]:
        return [PathPattern.parse(p) for p in self.config.exclude]

    def check(self) -> list[str]:
        root = self.root
        if not root.exists():
            return [f"local source: folder {root} does not exist"]
        if not root.is_dir():
            return [f"local source: {root} is not a folder"]
        if not os.access(root, os.R_OK | os.X_OK):
            return [f"local source: folder {root} cannot be read (permissions)"]
        return []

    # -- listing ---------------------------------------------------------------------------

    def list(self) -> Iterator[SourceRef]:
        root = Path(os.path.abspath(self.root))
        if not root.is_dir():
            raise FileNotFoundError(f"local source folder {root} does not exist or is not a folder")
        real_root = os.path.realpath(root)
        stack = [_Directory("", self._sorted_entries(root), self._identity(root))]
        while stack:
            current = stack[-1]
            entry = next(current.entries, None)
            if entry is None:
                stack.pop()
                continue
            relative = f"{current.relative}/{entry.name}" if current.relative else entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=self.config.follow_symlinks)
            except OSError as exc:
                log.debug("cannot inspect %s: %s", entry.path, exc)
                is_link, is_dir = False, False
            if is_link and not self.config.follow_symlinks:
                log.debug("not following symlink %s (follow_symlinks is off)", relative)
                continue
            if is_dir:
                if not self.config.recursive or any(p.matches_directory(relative) for p in self._exclude):
                    continue
                if is_link and not _is_within(os.path.realpath(entry.path), real_root):
                    yield self._unindexable_ref(relative, entry.path)  # read() names the reason
                    continue
                try:
                    identity = self._identity(entry.path)
                    if identity in {d.identity for d in stack}:
                        log.debug("not entering %s: a symlink loop back to a folder being walked", relative)
                        continue
                    entries = self._sorted_entries(entry.path)
                except OSError:
                    yield self._unindexable_ref(relative, entry.path)
                    continue
                stack.append(_Directory(relative, entries, identity))
            elif self._wanted(relative):
                yield self._file_ref(relative, entry.path)

    @staticmethod
    def _sorted_entries(path: str | Path) -> Iterator[os.DirEntry[str]]:
        with os.scandir(path) as scan:
            return iter(sorted(scan, key=lambda e: e.name))

    @staticmethod
    def _identity(path: str | Path) -> tuple[int, int]:
        info = os.stat(path)
        return info.st_dev, info.st_ino

    def _wanted(self, relative: str) -> bool:
        return any(p.matches(relative) for p in self._include) and not any(p.matches(relative) for p in self._exclude)

    def _metadata(self, relative: str) -> dict[str, str]:
        name = relative.rsplit("/", 1)[-1]
        return {
            "file_name": _printable(name),
            "relative_path": _printable(relative),
            "extension": PurePosixPath(name).suffix.lower().lstrip("."),
        }

    def _file_ref(self, relative: str, path: str) -> SourceRef:
        try:
            info = os.stat(path)
            size, signal = info.st_size, f"{info.st_size}:{info.st_mtime_ns}"
        except OSError:  # a broken symlink or a vanished file: read() reports why
            size, signal = 0, "unreadable"
        return SourceRef(
            source_id=f"{self.scope}{_printable(relative)}",
            uri=Path(path).as_uri(),
            media_type=media_type_for(relative),
            size=size,
            change_signal=signal,
            metadata=self._metadata(relative),
        )

    def _unindexable_ref(self, relative: str, path: str) -> SourceRef:
        """A directory that is listed only so that the run records why it was not indexed."""
        return SourceRef(
            source_id=f"{self.scope}{_printable(relative)}",
            uri=Path(path).as_uri(),
            media_type=DIRECTORY_MEDIA_TYPE,
            size=0,
            change_signal="unindexable",
            metadata=self._metadata(relative),
        )

    # -- reading ---------------------------------------------------------------------------

    def read(self, ref: SourceRef) -> bytes:
        path = _path_from_uri(ref.uri)
        root = os.path.realpath(os.path.abspath(self.root))
        if not _is_within(os.path.abspath(path), os.path.abspath(self.root)):
            raise ValueError(f"{ref.source_id}: {ref.uri} is not inside this source's folder {self.root}")
        target = os.path.realpath(path)
        if not _is_within(target, root):
            raise SymlinkOutsideRoot(f"symlink leaves the source root: it points to {target}, outside {root}")
        if not self.config.follow_symlinks and _has_symlink_between(path, os.path.abspath(self.root)):
            raise SymlinkOutsideRoot("path goes through a symlink and follow_symlinks is off")
        try:
            info = os.stat(path)
        except FileNotFoundError as exc:
            if os.path.islink(path):
                raise FileNotFoundError(f"broken symlink: its target {os.readlink(path)} does not exist") from exc
            raise FileNotFoundError("file no longer exists (deleted after listing)") from exc
        if stat.S_ISDIR(info.st_mode):
            raise NotAFile(f"directory could not be listed: {_listing_problem(path)}")
        if not stat.S_ISREG(info.st_mode):
            raise NotAFile(f"not a regular file ({_file_kind(info.st_mode)}); only regular files are indexed")
        self._check_size(info.st_size)
        try:
            with open(path, "rb") as handle:
                # Read one byte past the limit: a file that grew since the stat is still caught.
                data = handle.read(self.config.max_file_bytes + 1)
        except PermissionError as exc:
            raise PermissionError(f"permission denied reading the file ({exc.strerror})") from exc
        self._check_size(len(data))
        return data

    def _check_size(self, size: int) -> None:
        limit = self.config.max_file_bytes
        if size > limit:
            raise FileTooLarge(f"file is {_human_size(size)}, over max_file_bytes={limit} ({_human_size(limit)})")


# -- helpers ----------------------------------------------------------------------------------


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _has_symlink_between(path: str, root: str) -> bool:
    current = path
    while _is_within(current, root) and current != root:
        if os.path.islink(current):
            return True
        current = os.path.dirname(current)
    return False


def _path_from_uri(uri: str) -> str:
    if not uri.startswith("file://"):
        raise ValueError(f"not a file URI: {uri!r}")
    return os.fsdecode(unquote_to_bytes(uri[len("file://") :]))


def _printable(relative: str) -> str:
    """The name as valid Unicode, distinct for distinct names (see :func:`connectors.base.path_id`)."""
    return path_id(os.fsencode(relative))


def _human_size(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.0f} {unit}" if size >= 10 * factor else f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _listing_problem(path: str) -> str:
    try:
        with os.scandir(path):
            return "it was unreadable during the scan; it will be listed again on the next run"
    except OSError as exc:
        return exc.strerror or str(exc)
