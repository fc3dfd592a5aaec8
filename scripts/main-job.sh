#!/usr/bin/env bash
# The main job on a fresh machine: install, start Kafka, run one worker, replay
# the real DeepStream garage recording through it, and print what came out
# (and the live dashboard's address, with the API token made for the run).
# Extra arguments go to `python -m aggregator_app.demo` (see its --help).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
bash scripts/kafka.sh start
exec .venv/bin/python -m aggregator_app.demo "$@"
