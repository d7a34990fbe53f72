#!/usr/bin/env bash
# Generates the EXAMPLE certificates that docs/tls.md and examples/tls.yaml
# refer to: a private example CA and certificates it signs. For trying
# Portico out only — never use them for anything real.
#
#   scripts/gen-example-certs.sh [DIR]     (default: examples/certs)
#
# Needs openssl. Existing files in DIR are replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-examples/certs}"
mkdir -p "$dir"
cd "$dir"
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }

days=3650
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# The example CA (signs server and client certificates alike).
ec ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/O=Portico Example/CN=Portico Example CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem 2>/dev/null

# issue NAME "SUBJECT" "SANS" EKU
issue() {
  local name=$1 subject=$2 sans=$3 eku=$4
  ec "$name.key"
  openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n' \
    "$sans" "$eku" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

issue example.com "/O=Portico Example/CN=example.com" "DNS:example.com,DNS:www.example.com" serverAuth
issue wildcard.example.com "/O=Portico Example/CN=*.example.com" "DNS:*.example.com" serverAuth
issue api.example.org "/O=Portico Example/CN=api.example.org" "DNS:api.example.org" serverAuth
issue backend.internal "/O=Portico Example/CN=backend.internal" "DNS:backend.internal" serverAuth
issue client "/O=Portico Example/CN=example-client" "DNS:client.example.com,URI:spiffe://example.com/client" clientAuth
rm -f ca.srl
chmod 600 ./*.key
echo "example certificates written to $(pwd)"
