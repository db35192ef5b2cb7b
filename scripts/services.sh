#!/usr/bin/env bash
# Installs (Debian packages) and starts what outbox's tests and demo need, where missing:
# PostgreSQL on 127.0.0.1:5432 (user postgres, trust on loopback), MariaDB on 127.0.0.1:3306
# (root without a password; galera-4 beside it, for scripts/mariadb-node.sh) and RabbitMQ on
# 127.0.0.1:5672 (guest/guest), and headless Chromium with its WebDriver (/usr/bin/chromium,
# /usr/bin/chromedriver) for the status page's browser tests. Safe to run again: it only acts
# on what is absent or down.
set -euo pipefail

log() { printf 'services: %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do port_open "$1" && return 0; sleep 0.5; done
  log "$2 did not open port $1 within 60 s"; return 1
}

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql postgresql-client)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server mariadb-client)
# A one-node Galera cluster for the test that the relay refuses it (scripts/mariadb-node.sh).
[ -f /usr/lib/galera/libgalera_smm.so ] || missing+=(galera-4)
# Headless Chromium and its WebDriver for the status page's browser tests.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# Test certificates (scripts/test-certs.sh) for the TLS tests.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  wait_port 5432 PostgreSQL
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
  # A fresh package install asks loopback clients for a password: trust them instead.
  hba=$(su postgres -c "psql -Atc 'SHOW hba_file'")
  log "trusting loopback connections in $hba"
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  su postgres -c "psql -c 'SELECT pg_reload_conf()'" >/dev/null
fi

if ! port_open 3306; then
  log "starting MariaDB"
  install -d -o mysql -g mysql /run/mysqld
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_port 3306 MariaDB
fi
if ! mariadb -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1; then
  # A fresh package install lets root in over the socket only: let it in over TCP too.
  log "letting MariaDB's root in over 127.0.0.1 without a password"
  mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES"
fi

if ! port_open 5672; then
  log "starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
  rabbitmqctl -q await_startup >/dev/null
fi
log "PostgreSQL, MariaDB and RabbitMQ are up"
