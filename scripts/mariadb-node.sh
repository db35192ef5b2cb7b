#!/usr/bin/env bash
# A MariaDB server of its own beside the machine's (which is left alone): its own data folder
# and SQL port, with database `outbox` and root without a password on 127.0.0.1. Either a
# one-node Galera Cluster (wsrep_on, the galera-4 provider, bootstrapped as a new cluster),
# for the test that the relay refuses to lead there, or a server that requires TLS with the
# certificates of scripts/test-certs.sh, for the tests of ssl-mode. Runs as root.
#
#   scripts/mariadb-node.sh start DIR PORT galera GCOMM_PORT   a Galera node
#   scripts/mariadb-node.sh start DIR PORT tls CERT_DIR        TLS required (CERT_DIR/server.pem)
#   scripts/mariadb-node.sh stop DIR                           stop it and delete DIR
#
# scripts/services.sh installs galera-4.
set -euo pipefail

PROVIDER=/usr/lib/galera/libgalera_smm.so

start() {
  local dir=$1 port=$2 kind=$3 arg=$4 options ready
  mkdir -p "$dir/data"
  case "$kind" in
    galera)
      [ -f "$PROVIDER" ] || { echo "mariadb-node: $PROVIDER missing: run scripts/services.sh" >&2; exit 1; }
      options=(--wsrep-on=ON --wsrep-provider="$PROVIDER" --wsrep-cluster-address=gcomm://
        --wsrep-new-cluster --wsrep-node-address=127.0.0.1
        --wsrep-provider-options="base_port=$arg"
        --binlog-format=ROW --innodb-autoinc-lock-mode=2)
      ready="SHOW STATUS LIKE 'wsrep_ready'"
      ;;
    tls)
      cp "$arg/ca.pem" "$arg/server.pem" "$arg/server.key" "$dir/"
      options=(--ssl-ca="$dir/ca.pem" --ssl-cert="$dir/server.pem" --ssl-key="$dir/server.key"
        --require-secure-transport=ON)
      ready="SHOW VARIABLES LIKE 'have_ssl'"
      ;;
    *) echo "mariadb-node: galera or tls, not $kind" >&2; exit 2 ;;
  esac
  chown -R mysql:mysql "$dir"
  mariadb-install-db --no-defaults --user=mysql --datadir="$dir/data" \
    --auth-root-authentication-method=normal >"$dir/install.log" 2>&1
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dir/data" \
    --port="$port" --bind-address=127.0.0.1 --socket="$dir/sock" --pid-file="$dir/pid" \
    --log-error="$dir/error.log" --innodb-buffer-pool-size=32M "${options[@]}" \
    </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 120); do
    # The socket is local: TLS is not required on it.
    if mariadb -S "$dir/sock" -u root -Nse "$ready" 2>/dev/null | grep -qE 'ON|YES'; then
      mariadb -S "$dir/sock" -u root -e "CREATE DATABASE IF NOT EXISTS outbox;
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
        CREATE USER IF NOT EXISTS 'root'@'localhost' IDENTIFIED BY '';
        GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"
      return 0
    fi
    sleep 0.5
  done
  echo "mariadb-node: not ready within 60 s; see $dir/error.log" >&2
  exit 1
}

stop() {
  local dir=$1
  if [ -f "$dir/pid" ]; then
    local pid
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start "$2" "$3" "$4" "$5" ;;
  stop) stop "$2" ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
