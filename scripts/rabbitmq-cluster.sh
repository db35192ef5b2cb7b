#!/usr/bin/env bash
# A three-node RabbitMQ cluster on one machine, the way an operator builds one: each node has
# its own node name, AMQP port, distribution port, data and log folders; all share one Erlang
# cookie (the rabbitmq user's); nodes 2 and 3 join node 1. Runs as root.
#
#   scripts/rabbitmq-cluster.sh start          start the three nodes and form the cluster
#   scripts/rabbitmq-cluster.sh stop-node N    stop node N (1-3): a lost node
#   scripts/rabbitmq-cluster.sh start-node N   start node N again (it rejoins by itself)
#   scripts/rabbitmq-cluster.sh status         cluster status as node 1 sees it
#   scripts/rabbitmq-cluster.sh urls           the AMQP_URL for the three nodes
#   scripts/rabbitmq-cluster.sh teardown       stop every node and delete their data
#
# Node N: name outboxN@localhost, AMQP 127.0.0.1:568N, distribution port 2568N, folders under
# /var/lib/rabbitmq/outbox-cluster/nodeN. The machine's own broker (5672) is left alone.
set -euo pipefail

BASE=/var/lib/rabbitmq/outbox-cluster
node() { echo "outbox$1@localhost"; }
ctl() { local n=$1; shift; rabbitmqctl -q -n "$(node "$n")" "$@"; }
# shellcheck source=scripts/rabbitmq-node.sh
. "$(dirname "$0")/rabbitmq-node.sh"

start_node() {
  local n=$1 dir="$BASE/node$1"
  if ctl "$n" ping >/dev/null 2>&1; then return 0; fi
  mkdir -p "$dir"
  printf 'listeners.tcp.local = 127.0.0.1:568%s\nloopback_users = none\n' "$n" > "$dir/rabbitmq.conf"
  : > "$dir/enabled_plugins"
  run_node "$(node "$n")" "$dir" "2568$n"
}

cluster_started() {
  ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "$(node 3)"
}

case "${1:-}" in
  start)
    for n in 1 2 3; do start_node "$n"; done
    if ! cluster_started; then
      for n in 2 3; do
        ctl "$n" stop_app
        ctl "$n" reset
        ctl "$n" join_cluster "$(node 1)" 2>/dev/null
        ctl "$n" start_app
      done
    fi
    # Quorum queues take their members from the running nodes: wait until all three run.
    for _ in $(seq 1 120); do
      [ "$(ctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null)" = 3 ] && break
      sleep 0.5
    done
    for n in 1 2 3; do ctl "$n" await_startup --timeout 120 >/dev/null; done
    echo "cluster up: $("$0" urls)"
    ;;
  stop-node) ctl "${2:?node 1-3}" stop ;;
  start-node) start_node "${2:?node 1-3}" ;;
  status) ctl 1 cluster_status ;;
  urls) echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f" ;;
  teardown)
    for n in 1 2 3; do ctl "$n" stop >/dev/null 2>&1 || true; done
    rm -rf "$BASE"
    ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
