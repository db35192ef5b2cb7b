# Sourced by scripts/rabbitmq-cluster.sh and scripts/rabbitmq-tls.sh: one RabbitMQ node of a
# test's own, beside the machine's broker.
#
#   run_node NODE DIR DIST_PORT   start node NODE (e.g. outbox1@localhost) from DIR, which holds
#                                 its rabbitmq.conf and enabled_plugins, with its data and logs
#                                 in DIR too, and wait until it has started

run_node() {
  local node=$1 dir=$2 dist_port=$3
  mkdir -p "$dir/mnesia" "$dir/log"
  chown -R rabbitmq:rabbitmq "$dir"
  runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="$node" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_DIST_PORT="$dist_port" \
    /usr/lib/rabbitmq/bin/rabbitmq-server -detached
  for _ in $(seq 1 120); do rabbitmqctl -q -n "$node" ping >/dev/null 2>&1 && break; sleep 0.5; done
  rabbitmqctl -q -n "$node" await_startup --timeout 120 >/dev/null
}
