#!/bin/sh
# Sets up the domain broker of one FLUIDOS domain and enrols its nodes, with openssl.
#
#   domain.sh init DIR DOMAIN [PORT [BIND [HOSTNAME...]]]
#       Mints the domain CA and the broker's certificate (for HOSTNAMEs, plus localhost and
#       127.0.0.1), writes DIR/mosquitto.conf and DIR/acl from this folder's templates, and
#       builds the retained-storage plugin DIR/fluidos_retain.so from fluidos_retain.c (needs
#       gcc and the mosquitto 2 headers: Debian packages gcc, mosquitto-dev, libmosquitto-dev;
#       CC overrides the compiler). Run the broker with: mosquitto -c DIR/mosquitto.conf
#       PORT 8883 and BIND 0.0.0.0 by default.
#   domain.sh node DIR NODE_ID [DAYS]
#       Mints a node certificate (CN = NODE_ID) signed by the domain CA into
#       DIR/nodes/NODE_ID/: node.pem, node.key (0600), domain-ca.pem. Copy the three files
#       to the gateway (docs/security.md, "Enrol a node"). DAYS: 825 by default.
#   domain.sh plugin DIR
#       Rebuilds DIR/fluidos_retain.so (after a mosquitto upgrade, or for a domain set up
#       before the plugin existed: then also copy the `plugin` lines of this folder's
#       mosquitto.conf into DIR/mosquitto.conf, with DIR and the domain filled in).
#
# Keys are EC P-256. DIR/domain-ca.key signs every node: keep it offline once the
# domain is set up (move it away and bring it back to enrol a node).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "domain.sh: $*" >&2; exit 2; }
valid_id() {
    # Node ids and domains: [A-Za-z0-9._-], 1..48 bytes. A '/' or '+' in a CN would let a
    # node write under another node's topic level, so the script refuses them.
    case "$1" in ''|*[!A-Za-z0-9._-]*) return 1;; esac
    [ "${#1}" -le 48 ]
}
command -v openssl >/dev/null || die "openssl is not installed"

# The broker plugin that bounds retained storage (fluidos_retain.c): built for the broker
# host, loaded by mosquitto with `plugin` in mosquitto.conf.
build_plugin() {
    cc=${CC:-gcc}
    command -v "$cc" >/dev/null || die "$cc not found: the retained-storage plugin needs a C compiler (apt-get install gcc)"
    for h in mosquitto_broker.h mosquitto_plugin.h mosquitto.h; do
        printf '#include <%s>\n' "$h" | "$cc" -E -x c - >/dev/null 2>&1 \
            || die "header $h not found: apt-get install mosquitto-dev libmosquitto-dev"
    done
    "$cc" -shared -fPIC -O2 -Wall -Wextra -Werror -o "$1" "$here/fluidos_retain.c" \
        || die "building the retained-storage plugin failed"
    chmod 0755 "$1"
}

case "${1:-}" in
init)
    [ $# -ge 3 ] || die "usage: domain.sh init DIR DOMAIN [PORT [BIND [HOSTNAME...]]]"
    dir=$2; domain=$3; port=${4:-8883}; bind=${5:-0.0.0.0}
    shift 3; [ $# -gt 0 ] && shift; [ $# -gt 0 ] && shift
    valid_id "$domain" || die "domain '$domain': use A-Z a-z 0-9 . _ - (at most 48)"
    case "$port" in ''|*[!0-9]*) die "port '$port' is not a number";; esac
    [ -e "$dir/domain-ca.key" ] && die "$dir already holds a domain CA; not overwriting it"
    mkdir -p "$dir/data" "$dir/nodes"
    build_plugin "$dir/fluidos_retain.so"
    umask 077
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/domain-ca.key" -out "$dir/domain-ca.pem" -days 3650 \
        -subj "/O=FLUIDOS/OU=$domain/CN=$domain domain CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for h in "$@"; do
        case "$h" in *[!A-Za-z0-9.:-]*) die "hostname '$h' has odd characters";; esac
        case "$h" in *[!0-9.]*) case "$h" in *:*) san="$san,IP:$h";; *) san="$san,DNS:$h";; esac;; *) san="$san,IP:$h";; esac
    done
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/broker.key" -out "$dir/broker.csr" \
        -subj "/O=FLUIDOS/OU=$domain/CN=broker" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
        "$san" > "$dir/broker.ext"
    openssl x509 -req -in "$dir/broker.csr" -CA "$dir/domain-ca.pem" -CAkey "$dir/domain-ca.key" \
        -CAcreateserial -out "$dir/broker.pem" -days 825 -extfile "$dir/broker.ext" 2>/dev/null
    rm -f "$dir/broker.csr" "$dir/broker.ext"
    chmod 0644 "$dir/domain-ca.pem" "$dir/broker.pem"
    abs=$(cd "$dir" && pwd)
    for f in mosquitto.conf acl; do
        sed -e "s|@DOMAIN@|$domain|g" -e "s|@DIR@|$abs|g" -e "s|@PORT@|$port|g" \
            -e "s|@BIND@|$bind|g" "$here/$f" > "$dir/$f"
        chmod 0644 "$dir/$f"
    done
    # mosquitto drops privileges to its own user: give it the key by group, not by world.
    if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$dir/broker.key" "$dir/domain-ca.pem" "$dir/broker.pem" "$dir/acl" 2>/dev/null || true
        chgrp -R mosquitto "$dir/data"; chmod 0770 "$dir/data"; chmod 0640 "$dir/broker.key"
    fi
    echo "domain $domain: CA $dir/domain-ca.pem, broker listening on $bind:$port (TLS)"
    echo "start it:  mosquitto -c $abs/mosquitto.conf"
    ;;
node)
    [ $# -ge 3 ] || die "usage: domain.sh node DIR NODE_ID [DAYS]"
    dir=$2; node=$3; days=${4:-825}
    valid_id "$node" || die "node id '$node': use A-Z a-z 0-9 . _ - (at most 48)"
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    out="$dir/nodes/$node"
    [ -e "$out/node.pem" ] && die "$out/node.pem exists: node ids are unique in a domain"
    mkdir -p "$out"
    umask 077
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/node.key" -out "$out/node.csr" -subj "/O=FLUIDOS/CN=$node" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
        > "$out/node.ext"
    openssl x509 -req -in "$out/node.csr" -CA "$dir/domain-ca.pem" -CAkey "$dir/domain-ca.key" \
        -CAcreateserial -out "$out/node.pem" -days "$days" -extfile "$out/node.ext" 2>/dev/null
    rm -f "$out/node.csr" "$out/node.ext"
    cp "$dir/domain-ca.pem" "$out/domain-ca.pem"
    chmod 0600 "$out/node.key"; chmod 0644 "$out/node.pem" "$out/domain-ca.pem"
    echo "node $node: $out/node.pem, $out/node.key, $out/domain-ca.pem"
    ;;
plugin)
    [ $# -ge 2 ] || die "usage: domain.sh plugin DIR"
    [ -d "$2" ] || die "$2 is not a directory"
    build_plugin "$2/fluidos_retain.so"
    echo "built $2/fluidos_retain.so; restart mosquitto to load it"
    ;;
*)
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
