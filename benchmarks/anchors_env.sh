#!/usr/bin/env bash
# Recreates the virtual environment in which benchmarks/anchors_ingest.py runs LlamaIndex and LangChain.
#
#   bash benchmarks/anchors_env.sh [VENV_DIR]      default VENV_DIR: ../venvs/anchors beside the repository
#   MILVUS_LITE=2.5.1 bash benchmarks/anchors_env.sh
#
# MILVUS_LITE picks the Milvus Lite engine (3.2.2: the pure-Python/FAISS one; 2.5.1: the older C++
# one). Default: whatever the project's .venv has, so that both sides of the benchmark run the same
# engine. Re-running the script on an existing environment only switches what differs.
#
# Versions are the ones the published figures were measured with. torch is pinned in the same pip
# command as everything else: an unpinned torch (or anything pulling torchvision) brings a CUDA build.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/../venvs/anchors}"
if [[ -z "${MILVUS_LITE:-}" && -x "$repo/.venv/bin/python" ]]; then
    MILVUS_LITE="$("$repo/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("milvus-lite"))' 2>/dev/null || true)"
fi
MILVUS_LITE="${MILVUS_LITE:-3.2.2}"

[[ -x "$venv/bin/python" ]] || python3.11 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)

"${pip[@]}" \
    torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 sentence-transformers==6.2.0 \
    numpy==2.4.6 faiss-cpu==1.15.1 grpcio==1.85.3 protobuf==7.36.2 SQLAlchemy==2.1.9 \
    langchain-text-splitters==1.1.3 langchain==1.5.2 langchain-core==1.8.3 langchain-classic==1.0.8 \
    langchain-community==0.4.2 langchain-huggingface==1.2.3 langchain-milvus==0.4.0 \
    llama-index-core==0.14.25 llama-index-embeddings-huggingface==0.8.0 \
    pymilvus==3.0.2 milvus-lite==3.2.2

# llama-index-vector-stores-milvus 1.2.0 declares pymilvus<3, while langchain-milvus 0.4.0 needs
# pymilvus>=3 (langchain-milvus 0.3.3, the last for pymilvus 2.6, breaks on pymilvus 2.6.17, and
# pymilvus 2.6.9 breaks llama-index's Milvus store). The llama-index store runs on pymilvus 3.0.2,
# the client the project itself uses, so it goes in without its declared dependencies.
"${pip[@]}" --no-deps llama-index-vector-stores-milvus==1.2.0

# The engine last: langchain-milvus declares milvus-lite>=3.1, which 2.5.1 does not meet on paper,
# but pymilvus 3.0.2 drives either engine through milvus_lite.server_manager.
if [[ "$MILVUS_LITE" != "3.2.2" ]]; then
    # Milvus Lite 2.5 imports pkg_resources, which setuptools 81 removed (as in pyproject.toml).
    "${pip[@]}" --no-deps "milvus-lite==$MILVUS_LITE" "setuptools>=69,<81"
fi

"$venv/bin/python" - <<'EOF'
import importlib.metadata as m
print("anchors environment:", ", ".join(f"{n} {m.version(n)}" for n in ("pymilvus", "milvus-lite", "torch", "llama-index-core", "langchain-core")))
import milvus_lite  # noqa: F401  (fails here, not mid-benchmark, if the engine cannot load)
EOF
