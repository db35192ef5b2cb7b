#!/usr/bin/env bash
# A one-node MariaDB Galera Cluster beside the machine's own MariaDB, for the test that the
# relay refuses to lead there: its own data folder, SQL port and group-communication port,
# bootstrapped as a new cluster (wsrep_on, the galera-4 provider). Runs as root.
#
#   scripts/galera-node.sh start DIR PORT GCOMM_PORT   start it; database `outbox` exists once it returns
#   scripts/galera-node.sh stop DIR                    stop it and delete DIR
#
# The machine's MariaDB (3306) is left alone. scripts/services.sh installs galera-4.
set -euo pipefail

PROVIDER=/usr/lib/galera/libgalera_smm.so

start() {
  local dir=$1 port=$2 gcomm=$3
  [ -f "$PROVIDER" ] || { echo "galera-node: $PROVIDER missing: run scripts/services.sh" >&2; exit 1; }
  mkdir -p "$dir/data"
  chown -R mysql:mysql "$dir"
  mariadb-install-db --no-defaults --user=mysql --datadir="$dir/data" \
    --auth-root-authentication-method=normal >"$dir/install.log" 2>&1
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$dir/data" \
    --port="$port" --bind-address=127.0.0.1 --socket="$dir/sock" --pid-file="$dir/pid" \
    --log-error="$dir/error.log" --innodb-buffer-pool-size=32M \
    --wsrep-on=ON --wsrep-provider="$PROVIDER" --wsrep-cluster-address=gcomm:// \
    --wsrep-new-cluster --wsrep-node-address=127.0.0.1 \
    --wsrep-provider-options="base_port=$gcomm" \
    --binlog-format=ROW --innodb-autoinc-lock-mode=2 </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 120); do
    if mariadb -S "$dir/sock" -u root -Nse "SHOW STATUS LIKE 'wsrep_ready'" 2>/dev/null | grep -q ON; then
      mariadb -S "$dir/sock" -u root -e "CREATE DATABASE IF NOT EXISTS outbox;
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
        GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION"
      return 0
    fi
    sleep 0.5
  done
  echo "galera-node: not ready within 60 s; see $dir/error.log" >&2
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
  start) start "$2" "$3" "$4" ;;
  stop) stop "$2" ;;
  *) echo "usage: $0 start DIR PORT GCOMM_PORT | stop DIR" >&2; exit 2 ;;
esac
