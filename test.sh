#!/usr/bin/env bash
# Install (first time) with test extras, lint, and run the default test suite.
set -euo pipefail
cd "$(dirname "$0")"
AHEADLM_EXTRAS="[test]" . scripts/setup.sh
ruff check src tests benchmarks
ruff format --check src tests benchmarks
exec python -m pytest -q "$@"
