#!/usr/bin/env bash
# Run the test suite (CPU, tiny configs, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q tests "$@"
