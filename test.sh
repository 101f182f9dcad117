#!/usr/bin/env bash
# test.sh: set up (as root: Debian packages, .venv) and run lite's whole test
# suite: lint, format check, unit and process tests, and the Apache tests with
# test_siege.sh. Arguments go to pytest (e.g. ./test.sh -m "not apache").
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
