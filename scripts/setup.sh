#!/usr/bin/env bash
# Set up a fresh machine: the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA
# build), then the package with its test, quickstart, docs and deploy extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[test,quickstart,docs,deploy]"
