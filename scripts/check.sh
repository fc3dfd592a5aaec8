#!/usr/bin/env bash
# Formatting, lint and types: the same checks here and in CI (`.ci/run`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh >/dev/null
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy .
