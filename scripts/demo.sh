#!/usr/bin/env bash
# README command one: install (if needed) and run the demo on the embedded digits data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 scripts/rce_digits_demo.py "$@"
