#!/usr/bin/env bash
# The test suite on a fresh machine: install, start Kafka and ClickHouse,
# install Debian's Chromium (the dashboard's browser test), run the unit and
# integration tests. With CI set, a missing broker, server or browser fails
# the integration tests instead of skipping them.
# Extra arguments go to pytest (e.g. `-k dedup`, `tests/unit`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/kafka.sh start
bash scripts/clickhouse.sh start
bash scripts/chromium.sh
exec .venv/bin/pytest -q -p no:cacheprovider "${@:-tests}"
