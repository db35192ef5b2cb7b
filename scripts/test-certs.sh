#!/usr/bin/env bash
# Test certificates, made with the openssl CLI into DIR (once: an existing set is kept):
#
#   ca.pem, ca.key           the test CA
#   server.pem, server.key   signed by it for DNS:localhost and IP:127.0.0.1 (not 127.0.0.2)
#   client.pem, client.key   signed by it, CN=outbox-relay (the user EXTERNAL logs in as)
#   expired.pem, expired.key signed by it for DNS:localhost, expired since yesterday
#   wrong-ca.pem             an unrelated CA, which signed none of them
#
#   scripts/test-certs.sh DIR
set -euo pipefail

dir=${1:?usage: test-certs.sh DIR}
[ -f "$dir/wrong-ca.pem" ] && [ -f "$dir/expired.pem" ] && exit 0
mkdir -p "$dir"
cd "$dir"
days=3650

ca() { # name subject
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.pem" -days "$days" \
    -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

leaf() { # name subject extensions [days]
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "${4:-$days}" \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm "$1.csr" "$1.ext"
}

ca ca "outbox test CA"
leaf server localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
leaf client outbox-relay "extendedKeyUsage=clientAuth"
leaf expired localhost "subjectAltName=DNS:localhost
extendedKeyUsage=serverAuth" -1
ca wrong-ca "outbox unrelated CA"
rm wrong-ca.key
