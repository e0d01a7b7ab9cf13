#!/usr/bin/env bash
# Non-Python linters. Each section is filled in by the component it checks.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "lint.sh: ok"
