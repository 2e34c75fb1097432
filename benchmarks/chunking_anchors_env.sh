#!/usr/bin/env bash
# Recreates the virtual environment in which benchmarks/chunking_anchors.py runs the anchor chunkers
# (LangChain's text splitters, semchunk, Chonkie) for benchmarks/chunking_quality.py.
#
#   bash benchmarks/chunking_anchors_env.sh [VENV_DIR]   default VENV_DIR: ../venvs/chunk-anchors beside the repository
#
# Versions are the ones the published figures were measured with. None of them needs torch.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/../venvs/chunk-anchors}"
[[ -x "$venv/bin/python" ]] || python3.11 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    langchain-text-splitters==1.1.3 langchain-core==1.8.3 semchunk==4.1.1 chonkie==1.7.0 chonkie-core==0.10.2 \
    tiktoken==0.14.0
echo "$venv"
