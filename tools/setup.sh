#!/usr/bin/env bash
# Set up lorif-stream in ./.venv on a fresh machine, then run one job:
#   bash tools/setup.sh demo   [demo options]   # the bundled real example (lorif-stream demo)
#   bash tools/setup.sh test   [pytest options] # the test suite (what .ci/run calls)
#   bash tools/setup.sh        # set up only
# An existing torch (e.g. a CUDA build in the system Python) is kept: the venv sees system
# site-packages. With no torch anywhere, the CPU wheel torch==2.13.0 is installed first, because
# asking pip for an open torch range on a machine without torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"
[ $# -gt 0 ] && shift

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing the CPU build torch==2.13.0" >&2
    "$VPY" -m pip install --quiet "torch==2.13.0"
fi
extras="test"
[ "$job" = "demo" ] && extras="demo"
# requirements already satisfied (torch above, system packages) are left as they are
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"

case "$job" in
    test) exec "$VPY" -m pytest "$@" ;;
    demo) exec .venv/bin/lorif-stream demo "$@" ;;
    "") echo "[setup] ready: .venv/bin/lorif-stream --help" ;;
    *) echo "unknown job '$job' (use: demo | test)" >&2; exit 2 ;;
esac
