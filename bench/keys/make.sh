#!/bin/sh
# Regenerates the JWT benchmark's key pair, JWKS and token (openssl, basenc, xxd):
#   private.pem  RSA-2048 private key (a benchmark key: committed on purpose)
#   jwks.json    its public key as a JWKS (kid bench-1), used by bench/jwt.yaml
#   token.txt    an RS256 token for issuer https://id.bench.local, audience
#                bench, subject bench-user, scope feed.read, expiring in 2100
set -eu
cd "$(dirname "$0")"
b64url() { basenc --base64url -w0 | tr -d '='; }

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out private.pem 2>/dev/null
n=$(openssl rsa -in private.pem -noout -modulus | cut -d= -f2 | xxd -r -p | b64url)
printf '{"keys":[{"kty":"RSA","kid":"bench-1","use":"sig","alg":"RS256","n":"%s","e":"AQAB"}]}\n' "$n" > jwks.json

header=$(printf '{"alg":"RS256","typ":"JWT","kid":"bench-1"}' | b64url)
payload=$(printf '{"iss":"https://id.bench.local","aud":"bench","sub":"bench-user","scope":"feed.read","iat":1767225600,"exp":4102444800}' | b64url)
sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign private.pem -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$sig" > token.txt
echo "wrote private.pem, jwks.json, token.txt in $(pwd)"
