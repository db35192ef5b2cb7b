#!/usr/bin/env bash
# A RabbitMQ node with a TLS listener, beside the machine's own broker (5672, left alone):
# node name outbox-tls@localhost, plain AMQP on 127.0.0.1:5690 (for setting up tests),
# AMQPS on 127.0.0.1:5691 and 127.0.0.2:5691 (its certificate names localhost and 127.0.0.1
# only: 127.0.0.2 is a host name mismatch), distribution port 25690, folders under
# /var/lib/rabbitmq/outbox-tls. Certificates from scripts/test-certs.sh in its certs folder.
# Clients may present a certificate signed by the test CA (verify_peer, not required); the
# EXTERNAL mechanism (plugin rabbitmq_auth_mechanism_ssl) logs them in as its CN, and the user
# outbox-relay (no password) exists with every permission on /. Runs as root.
#
#   scripts/rabbitmq-tls.sh start      make the certificates and start the node
#   scripts/rabbitmq-tls.sh certs      the certificates' folder
#   scripts/rabbitmq-tls.sh ctl ARGS   rabbitmqctl against this node
#   scripts/rabbitmq-tls.sh teardown   stop the node and delete its data and certificates
set -euo pipefail

BASE=/var/lib/rabbitmq/outbox-tls
NODE=outbox-tls@localhost
CERTS=$BASE/certs
ctl() { rabbitmqctl -q -n "$NODE" "$@"; }
# shellcheck source=scripts/rabbitmq-node.sh
. "$(dirname "$0")/rabbitmq-node.sh"

config() {
  cat <<CONF
listeners.tcp.local = 127.0.0.1:5690
listeners.ssl.local = 127.0.0.1:5691
listeners.ssl.mismatch = 127.0.0.2:5691
ssl_options.cacertfile = $CERTS/ca.pem
ssl_options.certfile = $CERTS/server.pem
ssl_options.keyfile = $CERTS/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
ssl_cert_login_from = common_name
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
loopback_users = none
CONF
}

start() {
  if ctl ping >/dev/null 2>&1; then return 0; fi
  "$(dirname "$0")/test-certs.sh" "$CERTS"
  mkdir -p "$BASE"
  config > "$BASE/rabbitmq.conf"
  echo '[rabbitmq_auth_mechanism_ssl].' > "$BASE/enabled_plugins"
  run_node "$NODE" "$BASE" 25690
  ctl list_users --formatter json | grep -q '"outbox-relay"' || {
    ctl add_user outbox-relay "$(head -c 24 /dev/urandom | base64)" >/dev/null
    ctl clear_password outbox-relay >/dev/null
    ctl set_permissions -p / outbox-relay '.*' '.*' '.*' >/dev/null
  }
}

case "${1:-}" in
  start) start; echo "TLS node up: amqps://localhost:5691 (certificates in $CERTS)" ;;
  certs) echo "$CERTS" ;;
  ctl) shift; ctl "$@" ;;
  teardown)
    ctl stop >/dev/null 2>&1 || true
    rm -rf "$BASE"
    ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
