#!/usr/bin/env bash
# README command one: install (if needed), then run the end-to-end demo on the embedded
# digits data. Extra arguments go to `rce-fast demo` (see `rce-fast demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
rce-fast demo "$@"
