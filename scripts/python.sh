#!/usr/bin/env bash
# The Python package `flowgate` (python/): built from source into a fresh
# virtualenv the way a user installs it (`pip install ./python`, maturin as
# the PEP 517 backend), then linted (ruff), type-checked (mypy --strict)
# and tested against the local broker (pytest: the package's tests, its
# docstring examples, the README's quickstart, the python-orders example's
# tests), and the python-orders demo run end to end.
#
# Usage: scripts/python.sh     (scripts/test.sh runs it; the services must be up)
#
# Everything comes from the package registries by name. Set
# FLOWGATE_PY_RELEASE=1 for a release build of the extension (the default
# is Cargo's dev profile: the tests do not need the speed, CI needs the time).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${FLOWGATE_PY_VENV:-target/py-venv}"

"$PYTHON" -m venv --clear "$VENV"
PY="$VENV/bin/python"
if [[ "${FLOWGATE_PY_RELEASE:-0}" != 1 ]]; then
    export MATURIN_PEP517_ARGS="--profile dev"
fi
"$PY" -m pip install --quiet ./python
"$PY" -m pip install --quiet pytest pytest-asyncio pytest-timeout ruff mypy \
    -r examples/python-orders/requirements.txt

echo "--- import and help(flowgate.App)"
"$PY" -c "import flowgate; help(flowgate.App)" > "$VENV/help.txt"
head -n 12 "$VENV/help.txt"

echo "--- ruff, mypy"
"$VENV/bin/ruff" check python/flowgate python/tests
"$VENV/bin/ruff" format --check python/flowgate python/tests
(cd examples/python-orders && "../../$VENV/bin/ruff" check . && "../../$VENV/bin/ruff" format --check .)
(cd benches/python && "../../$VENV/bin/ruff" check . && "../../$VENV/bin/ruff" format --check .)
# (The bench is type-checked where its comparison libraries are installed.)
(cd python && "../$VENV/bin/mypy" && "../$VENV/bin/mypy" --strict tests ../examples/python-orders)

echo "--- pytest (the package's tests, docstring examples, README quickstart; the example's tests)"
# From python/: the tests import the installed package, never the source
# tree (which has no compiled module).
(cd python && "../$VENV/bin/pytest" tests --timeout 300 -q)
(cd examples/python-orders && "../../$VENV/bin/pytest" --timeout 300 -q)

echo "--- examples/python-orders demo"
"$PY" examples/python-orders/demo.py --orders "${FLOWGATE_PY_DEMO_ORDERS:-1500}"
