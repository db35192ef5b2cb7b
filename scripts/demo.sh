#!/usr/bin/env bash
# The quick start: starts PostgreSQL, MariaDB and RabbitMQ (installing them if missing), then
# runs the order/payment saga with chaos (orders on PostgreSQL, payments on MariaDB). Extra
# arguments go to the demo (e.g. --orders 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo run --release --example order_payment -- --orders 500 --chaos "$@"
