#!/usr/bin/env bash
# The test suite: starts the services it needs, then runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test
