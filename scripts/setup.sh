#!/usr/bin/env bash
# Install what the project needs on a fresh machine: the Python environment
# (.venv with the package, test and dev extras). Kafka's jars and ClickHouse's
# Debian packages are installed by scripts/kafka.sh and scripts/clickhouse.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed, found $("$python" --version 2>&1)" >&2
  exit 1
fi
command -v java >/dev/null || { echo "setup: Java 17 is needed for Kafka" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi

# A marker of what was installed: skip pip when pyproject.toml has not changed.
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[test,dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: python environment ready in .venv"
