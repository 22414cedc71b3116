#!/usr/bin/env bash
# Install (first time) and run aheadlm on the default model: ./run.sh ["prompt"] [aheadlm generate flags]
set -euo pipefail
cd "$(dirname "$0")"
. scripts/setup.sh
prompt=${1:-"The history of the printing press begins"}
shift || true
exec aheadlm generate "$prompt" --max-tokens 128 --stats "$@"
