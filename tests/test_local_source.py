"""LocalDirectorySource: listing rules, identities, and the reasons it gives for unreadable items."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (imports the package in its supported order)
from connectors.local import (
    FileTooLarge,
    LocalDirectorySource,
    NotAFile,
    SymlinkOutsideRoot,
    media_type_for,
)
from core.types import SourceRef


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def relative_paths(source: LocalDirectorySource) -> list[str]:
    return [ref.metadata["relative_path"] for ref in source.list()]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(
        tmp_path / "docs",
        {
            "b.md": "# B",
            "a.txt": "a",
            "guide/intro.md": "# Intro",
            "guide/deep/notes.txt": "notes",
            "drafts/wip.md": "wip",
            ".hidden.md": "secret",
            ".git/config": "[core]",
            "guide/.cache/x.md": "cache",
        },
    )


def test_lists_every_visible_file_sorted_with_identity_and_change_signal(tree: Path) -> None:
    source = LocalDirectorySource(path=str(tree))
    refs = list(source.list())
    assert [r.source_id for r in refs] == [
        "docs/a.txt",
        "docs/b.md",
        "docs/drafts/wip.md",
        "docs/guide/deep/notes.txt",
        "docs/guide/intro.md",
    ]
    intro = refs[-1]
    info = (tree / "guide/intro.md").stat()
    assert intro.uri == (tree / "guide/intro.md").as_uri()
    assert intro.media_type == "text/markdown"
    assert intro.size == len("# Intro")
    assert intro.change_signal == f"{info.st_size}:{info.st_mtime_ns}"
    assert intro.metadata == {"file_name": "intro.md", "relative_path": "guide/intro.md", "extension": "md"}
    assert source.scope == "docs/"
    assert all(r.source_id.startswith(source.scope) for r in refs)
    assert source.read(intro) == b"# Intro"


def test_order_is_deterministic_across_creation_orders(tmp_path: Path) -> None:
    names = ["zeta.md", "Alpha.md", "beta/x.md", "beta.md", "10.md", "9.md"]
    first = make_tree(tmp_path / "one" / "docs", {n: n for n in names})
    second = make_tree(tmp_path / "two" / "docs", {n: n for n in reversed(names)})
    one = [r.source_id for r in LocalDirectorySource(path=str(first)).list()]
    two = [r.source_id for r in LocalDirectorySource(path=str(second)).list()]
    assert one == two == ["docs/10.md", "docs/9.md", "docs/Alpha.md", "docs/beta/x.md", "docs/beta.md", "docs/zeta.md"]


def test_include_and_exclude_patterns(tree: Path) -> None:
    only_markdown = LocalDirectorySource(path=str(tree), include=["*.md"])
    assert relative_paths(only_markdown) == ["b.md", "drafts/wip.md", "guide/intro.md"]

    under_guide = LocalDirectorySource(path=str(tree), include=["guide/**/*.txt"])
    assert relative_paths(under_guide) == ["guide/deep/notes.txt"]

    no_drafts = LocalDirectorySource(path=str(tree), exclude=[".*", "drafts/**", "*.txt"])
    assert relative_paths(no_drafts) == ["b.md", "guide/intro.md"]

    with_hidden = LocalDirectorySource(path=str(tree), exclude=[])
    assert ".git/config" in relative_paths(with_hidden)
    assert ".hidden.md" in relative_paths(with_hidden)


def test_excluded_directories_are_not_entered(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path):  # type: ignore[no-untyped-def]
        entered.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    list(LocalDirectorySource(path=str(tree), exclude=[".*", "drafts"]).list())
    assert not any(p.endswith((".git", "drafts", ".cache")) for p in entered)


def test_recursion_off_lists_only_the_top_level(tree: Path) -> None:
    assert relative_paths(LocalDirectorySource(path=str(tree), recursive=False)) == ["a.txt", "b.md"]


def test_listing_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "many", {f"d{d:02}/f{f:02}.txt": "x" for d in range(20) for f in range(5)})
    opened: list[str] = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: (opened.append(os.fspath(path)), real_scandir(path))[1])
    listing = LocalDirectorySource(path=str(root)).list()
    assert isinstance(listing, types.GeneratorType)
    assert opened == []  # nothing is touched before the first item is asked for
    first = next(listing)
    assert first.metadata["relative_path"] == "d00/f00.txt"
    assert len(opened) == 2  # the root and the first directory only, not all 20


def test_namespace_default_and_override(tree: Path) -> None:
    assert LocalDirectorySource(path=str(tree)).scope == "docs/"
    custom = LocalDirectorySource(path=str(tree), namespace="team-handbook")
    assert custom.scope == "team-handbook/"
    assert next(custom.list()).source_id == "team-handbook/a.txt"
    with pytest.raises(ValueError):
        LocalDirectorySource(path=str(tree), namespace="/")


def test_relative_path_resolves_against_base_dir(tree: Path) -> None:
    source = LocalDirectorySource(path="docs")
    source.base_dir = tree.parent
    assert relative_paths(source)[0] == "a.txt"
    assert source.to_dict() == {"type": "local", "path": "docs"}
    assert LocalDirectorySource.from_dict(source.to_dict()).config == source.config


def test_symlink_leaving_the_root_is_listed_and_refused_at_read(tmp_path: Path) -> None:
    outside = make_tree(tmp_path / "outside", {"secret.txt": "top secret", "dir/more.txt": "more"})
    root = make_tree(tmp_path / "docs", {"inside.md": "# in", "sub/target.md": "# target"})
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "leakdir").symlink_to(outside / "dir", target_is_directory=True)
    (root / "alias.md").symlink_to(root / "sub" / "target.md")
    source = LocalDirectorySource(path=str(root))
    refs = {r.metadata["relative_path"]: r for r in source.list()}
    assert set(refs) == {"alias.md", "inside.md", "leak.txt", "leakdir", "sub/target.md"}
    assert source.read(refs["alias.md"]) == b"# target"  # a link that stays inside is followed
    for name in ("leak.txt", "leakdir"):
        with pytest.raises(SymlinkOutsideRoot, match="symlink leaves the source root"):
            source.read(refs[name])
    assert issubclass(SymlinkOutsideRoot, OSError)

    not_following = LocalDirectorySource(path=str(root), follow_symlinks=False)
    assert relative_paths(not_following) == ["inside.md", "sub/target.md"]


def test_symlink_loop_does_not_hang(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"a/file.md": "x"})
    (root / "a" / "again").symlink_to(root, target_is_directory=True)
    assert relative_paths(LocalDirectorySource(path=str(root))) == ["a/file.md"]


def test_broken_symlink_fails_at_read_with_reason(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"ok.md": "x"})
    (root / "gone.md").symlink_to(root / "missing.md")
    source = LocalDirectorySource(path=str(root))
    refs = {r.metadata["relative_path"]: r for r in source.list()}
    with pytest.raises(FileNotFoundError, match="broken symlink"):
        source.read(refs["gone.md"])


def test_file_over_size_limit_is_listed_and_fails_at_read(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"small.txt": "x" * 10, "big.txt": "x" * 3_000_000})
    source = LocalDirectorySource(path=str(root), max_file_bytes=1_000_000)
    refs = {r.metadata["relative_path"]: r for r in source.list()}
    assert refs["big.txt"].size == 3_000_000
    with pytest.raises(FileTooLarge, match=r"file is 3\.0 MB, over max_file_bytes=1000000"):
        source.read(refs["big.txt"])
    assert source.read(refs["small.txt"]) == b"x" * 10


def test_file_that_grew_after_listing_is_still_capped(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"log.txt": "x" * 10})
    source = LocalDirectorySource(path=str(root), max_file_bytes=100)
    ref = next(source.list())
    (root / "log.txt").write_text("x" * 500)
    with pytest.raises(FileTooLarge):
        source.read(ref)


def test_hostile_file_names(tmp_path: Path) -> None:
    names = ["a\"b'c.md", "with space.md", "ünïcødé 文档.md", "new\nline.md", "100%.md", "hash#q?.md"]
    root = make_tree(tmp_path / "docs", {name: name for name in names})
    source = LocalDirectorySource(path=str(root))
    refs = list(source.list())
    assert sorted(r.metadata["file_name"] for r in refs) == sorted(names)
    for ref in refs:
        assert ref.source_id == f"docs/{ref.metadata['file_name']}"
        assert "\n" not in ref.uri and " " not in ref.uri  # percent-encoded
        assert source.read(ref) == ref.metadata["file_name"].encode()


def test_non_utf8_file_name_gets_a_valid_unicode_id(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    raw = os.path.join(os.fsencode(root), b"caf\xe9.txt")
    with open(raw, "wb") as handle:
        handle.write(b"latin-1 name")
    source = LocalDirectorySource(path=str(root))
    (ref,) = source.list()
    ref.source_id.encode("utf-8")  # must not raise: ids go to JSON and Milvus
    assert ref.source_id == "docs/caf\\xe9.txt"
    assert source.read(ref) == b"latin-1 name"


def test_named_pipe_is_listed_and_refused_without_blocking(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"a.md": "x"})
    os.mkfifo(root / "pipe.txt")
    source = LocalDirectorySource(path=str(root))
    refs = {r.metadata["relative_path"]: r for r in source.list()}
    with pytest.raises(NotAFile, match="named pipe"):
        source.read(refs["pipe.txt"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_and_directory_fail_with_reason(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"locked.md": "x", "closed/inner.md": "y"})
    (root / "locked.md").chmod(0)
    (root / "closed").chmod(0)
    try:
        source = LocalDirectorySource(path=str(root))
        refs = {r.metadata["relative_path"]: r for r in source.list()}
        with pytest.raises(PermissionError, match="permission denied"):
            source.read(refs["locked.md"])
        with pytest.raises(NotAFile, match="directory could not be listed"):
            source.read(refs["closed"])
    finally:
        (root / "closed").chmod(0o755)


def test_deleted_after_listing(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"a.md": "x"})
    source = LocalDirectorySource(path=str(root))
    ref = next(source.list())
    (root / "a.md").unlink()
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        source.read(ref)


def test_read_refuses_uris_outside_the_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "docs", {"a.md": "x"})
    make_tree(tmp_path, {"other.md": "y"})
    source = LocalDirectorySource(path=str(root))
    forged = SourceRef("docs/../other.md", (root / ".." / "other.md").as_uri(), "text/markdown", 1, "1:1")
    with pytest.raises(ValueError, match="not inside this source's folder"):
        source.read(forged)


def test_missing_folder(tmp_path: Path) -> None:
    source = LocalDirectorySource(path=str(tmp_path / "nope"))
    assert source.check() and "does not exist" in source.check()[0]
    with pytest.raises(FileNotFoundError):
        next(source.list())


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("a.md", "text/markdown"),
        ("a.MARKDOWN", "text/markdown"),
        ("a.rst", "text/x-rst"),
        ("a.org", "text/org"),
        ("a.eml", "message/rfc822"),
        ("a.msg", "application/vnd.ms-outlook"),
        ("a.epub", "application/epub+zip"),
        ("a.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("a.pptx", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
        ("a.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("a.odt", "application/vnd.oasis.opendocument.text"),
        ("a.rtf", "text/rtf"),
        ("a.tsv", "text/tab-separated-values"),
        ("a.ndjson", "application/x-ndjson"),
        ("a.pdf", "application/pdf"),
        ("a.html", "text/html"),
        ("README", "application/octet-stream"),
    ],
)
def test_media_types(name: str, media_type: str) -> None:
    assert media_type_for(name) == media_type


def test_unknown_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalDirectorySource(path=str(tmp_path), recurse=False)
    with pytest.raises(ValueError):
        LocalDirectorySource(path=str(tmp_path), max_file_bytes=0)
