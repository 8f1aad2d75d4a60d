#!/usr/bin/env bash
# Run the test suite (CPU, tiny configs).
#   bash scripts/test.sh            # the full suite, as CI runs it (nnictl integration tests included)
#   bash scripts/test.sh --fast     # the fast lane: everything but the `integration` tests (-m "not integration")
# Other arguments go to pytest (e.g. bash scripts/test.sh --fast -x -k warm_worker).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
    shift
    exec python3 -m pytest -q -m "not integration" tests "$@"
fi
exec python3 -m pytest -q tests "$@"
