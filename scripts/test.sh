#!/usr/bin/env bash
# The test suite on a fresh machine: install, start Kafka and ClickHouse, run
# the unit and integration tests. With CI set, a missing broker or server
# fails the integration tests instead of skipping them.
# Extra arguments go to pytest (e.g. `-k dedup`, `tests/unit`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/kafka.sh start
bash scripts/clickhouse.sh start
exec .venv/bin/pytest -q -p no:cacheprovider "${@:-tests}"
