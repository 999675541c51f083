#!/bin/bash
# mkpki.sh DIR — a throw-away test PKI for mutual TLS (reference/reliability.md B2).
#
# Writes into DIR (created if needed), EC P-256 keys throughout (fast):
#   ca.pem ca.key                 the test CA
#   primary.pem primary.key       primary.test.local  (serverAuth+clientAuth, SAN)
#   replica.pem replica.key       replica.test.local  (serverAuth+clientAuth, SAN)
#   evilca.pem evilca.key         an unrelated CA
#   evil.pem evil.key             primary.test.local signed by evilca
#   noclientauth.pem .key         primary.test.local with serverAuth only
#   noserverauth.pem .key         replica.test.local with clientAuth only
#   revoked.pem revoked.key       primary.test.local, revoked by the CA
#   crl.pem                       the CA's revocation list (revokes it)
#   expired.pem expired.key       primary.test.local (both EKUs, SAN) whose
#                                 notAfter is two days in the past
#   future.pem future.key         primary.test.local (both EKUs, SAN) whose
#                                 notBefore is two days in the future
# Every other certificate's notBefore is backdated one hour (openssl ca
# -startdate), so small clock differences between hosts do not fail the
# handshake.
# Idempotent: does nothing if DIR/ca.pem already exists.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
if [ -e "$dir/ca.pem" ]; then
    exit 0
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d "$dir/.mkpki.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
mkdir "$out"

start=$(date -u -d '-1 hour' +%Y%m%d%H%M%SZ)
end=$(date -u -d '+365 days' +%Y%m%d%H%M%SZ)
# The validity windows of the expired and the not-yet-valid certificates:
# days away from now, so no clock skew makes either valid.
past_start=$(date -u -d '-30 days' +%Y%m%d%H%M%SZ)
past_end=$(date -u -d '-2 days' +%Y%m%d%H%M%SZ)
future_start=$(date -u -d '+2 days' +%Y%m%d%H%M%SZ)

# openssl ca keeps a small database per CA.
cadb() { # name
    local d="$work/db-$1"
    mkdir -p "$d/new"
    : >"$d/index.txt"
    printf '01\n' >"$d/serial"
    cat >"$d/ca.cnf" <<CNF
[ ca ]
default_ca = ca_default
[ ca_default ]
dir = $d
database = \$dir/index.txt
new_certs_dir = \$dir/new
serial = \$dir/serial
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[ policy_any ]
commonName = supplied
CNF
}

newkey() { # name
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$out/$1.key" 2>/dev/null
    chmod 600 "$out/$1.key"
}

mkca() { # name
    local n=$1
    cadb "$n"
    newkey "$n"
    openssl req -new -key "$out/$n.key" -subj "/CN=vmreplica test $n" \
        -out "$work/$n.csr"
    printf '%s\n' 'basicConstraints=critical,CA:TRUE' \
        'keyUsage=critical,keyCertSign,cRLSign' \
        'subjectKeyIdentifier=hash' >"$work/$n.ext"
    openssl ca -batch -notext -selfsign -config "$work/db-$n/ca.cnf" \
        -keyfile "$out/$n.key" -in "$work/$n.csr" -out "$out/$n.pem" \
        -startdate "$start" -enddate "$end" -extfile "$work/$n.ext" \
        2>"$work/$n.err" || { cat "$work/$n.err" >&2; exit 1; }
}

mkcert() { # name fqdn eku [ca [startdate enddate]]
    local n=$1 fqdn=$2 eku=$3 ca=${4:-ca} from=${5:-$start} to=${6:-$end}
    newkey "$n"
    openssl req -new -key "$out/$n.key" -subj "/CN=$fqdn" -out "$work/$n.csr"
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
        'keyUsage=critical,digitalSignature,keyEncipherment' \
        "extendedKeyUsage=$eku" "subjectAltName=DNS:$fqdn" \
        'authorityKeyIdentifier=keyid' >"$work/$n.ext"
    openssl ca -batch -notext -config "$work/db-$ca/ca.cnf" \
        -cert "$out/$ca.pem" -keyfile "$out/$ca.key" -in "$work/$n.csr" \
        -out "$out/$n.pem" -startdate "$from" -enddate "$to" \
        -extfile "$work/$n.ext" 2>"$work/$n.err" ||
        { cat "$work/$n.err" >&2; exit 1; }
}

mkca ca
mkca evilca
# Hyper-V style: one certificate per host, both EKUs (roles swap on failover).
mkcert primary primary.test.local serverAuth,clientAuth
mkcert replica replica.test.local serverAuth,clientAuth
# Negative cases.
mkcert evil primary.test.local serverAuth,clientAuth evilca
mkcert noclientauth primary.test.local serverAuth
mkcert noserverauth replica.test.local clientAuth
mkcert revoked primary.test.local serverAuth,clientAuth
openssl ca -batch -config "$work/db-ca/ca.cnf" -cert "$out/ca.pem" \
    -keyfile "$out/ca.key" -revoke "$out/revoked.pem" 2>"$work/revoke.err" ||
    { cat "$work/revoke.err" >&2; exit 1; }
openssl ca -batch -config "$work/db-ca/ca.cnf" -cert "$out/ca.pem" \
    -keyfile "$out/ca.key" -gencrl -crldays 365 -out "$out/crl.pem" \
    2>"$work/crl.err" || { cat "$work/crl.err" >&2; exit 1; }
mkcert expired primary.test.local serverAuth,clientAuth ca \
    "$past_start" "$past_end"
mkcert future primary.test.local serverAuth,clientAuth ca \
    "$future_start" "$end"
# Publish atomically enough: ca.pem, the marker of a complete DIR, goes last.
for f in "$out"/*; do
    [ "${f##*/}" = ca.pem ] || mv -f "$f" "$dir/"
done
mv -f "$out/ca.pem" "$dir/ca.pem"
