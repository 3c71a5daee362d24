#!/usr/bin/env bash
# Set up (or refresh) .venv and run the whole test suite, slow tests included.
# The suite runs on up to 4 worker processes (pytest-xdist; one per core), each test file on one worker so that a
# file's shared fixtures (the 2-process launches) run once; each worker's torch uses one thread. Pass -n 0 to run
# in this process alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=$(.venv/bin/python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
