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
#   domain.sh site DIR SITE CORE_HOST[:CORE_PORT] [PORT [BIND [HOSTNAME...]]]
#       A site broker bridged to the domain's core broker (the one `init` set up in DIR):
#       DIR/sites/SITE/ holds its broker certificate (for HOSTNAMEs, plus localhost and
#       127.0.0.1), the domain CA, the node ACL, the plugin, and a mosquitto.conf like the
#       core's plus a bridge: mutual TLS to CORE_HOST:CORE_PORT (8883 by default; the host
#       must be one of the core's HOSTNAMEs) with the certificate bridge.pem, CN
#       `bridge:SITE` (no node id can contain ':'), carrying fluidos/v1/DOMAIN/# both ways
#       at QoS 1. Adds `user bridge:SITE` with the domain's topics to DIR/acl: reload the
#       core (SIGHUP) after. Nodes of the site are enrolled with `node DIR` as usual and
#       pointed at the site broker. Copy DIR/sites/SITE to the site's host and run
#       mosquitto -c .../mosquitto.conf there.  PORT 8883 and BIND 0.0.0.0 by default.
#   domain.sh supernode DIR NAME [DAYS]
#       Enrols a supernode (fluidlet-supernode, docs/supernode.md): the REAR-over-HTTP face
#       through which FLUIDOS reference nodes buy from the domain's providers. Mints
#       DIR/supernodes/NAME/supernode.{pem,key} (CN `supernode:NAME`, a CN no node id can
#       be) and domain-ca.pem, and adds `user supernode:NAME` to DIR/acl: read the catalog,
#       mail both ways, which the broker plugin narrows to mail from and to `ref-` buyers
#       only. Reload the broker (SIGHUP) after.
#   domain.sh refnode DIR NAME LIQO_ID [DAYS]
#       Admits the reference node whose Liqo cluster id is LIQO_ID as a buyer through
#       supernode NAME: mints DIR/supernodes/NAME/refs/ID/node.{pem,key} with CN
#       ID = ref-{first 32 hex digits of SHA-256(LIQO_ID)}, the buyer id the supernode
#       speaks as for it (providers seal its peering credentials to this certificate).
#       Copy DIR/supernodes/NAME to the supernode's host.
#
# INSTALL_DIR: the path the directory will have on the broker host (init: DIR; site:
# DIR/sites/SITE), written into its mosquitto.conf; by default where it is made.
# Keys are EC P-256. DIR/domain-ca.key signs every node: keep it offline once the
# domain is set up (move it away and bring it back to enrol a node or a site).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "domain.sh: $*" >&2; exit 2; }
valid_id() {
    # Node ids and domains: [A-Za-z0-9._-], 1..48 bytes. A '/' or '+' in a CN would let a
    # node write under another node's topic level, so the script refuses them.
    case "$1" in ''|*[!A-Za-z0-9._-]*) return 1;; esac
    [ "${#1}" -le 48 ]
}
# The buyer id a supernode speaks as for the reference node of Liqo cluster id $1.
ref_id() {
    h=$(printf '%s' "$1" | openssl dgst -sha256 -r | cut -c1-32)
    [ "${#h}" -eq 32 ] || die "openssl dgst -sha256 failed"
    echo "ref-$h"
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

# broker_cert CADIR OUT DOMAIN [HOSTNAME...]: OUT/broker.{pem,key} (serverAuth, CN broker)
# signed by CADIR's CA, for the HOSTNAMEs plus localhost, 127.0.0.1 and ::1.
broker_cert() {
    ca=$1; out=$2; dom=$3; shift 3
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for h in "$@"; do
        case "$h" in *[!A-Za-z0-9.:-]*) die "hostname '$h' has odd characters";; esac
        case "$h" in *[!0-9.]*) case "$h" in *:*) san="$san,IP:$h";; *) san="$san,DNS:$h";; esac;; *) san="$san,IP:$h";; esac
    done
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/broker.key" -out "$out/broker.csr" \
        -subj "/O=FLUIDOS/OU=$dom/CN=broker" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
        "$san" > "$out/broker.ext"
    openssl x509 -req -in "$out/broker.csr" -CA "$ca/domain-ca.pem" -CAkey "$ca/domain-ca.key" \
        -CAcreateserial -out "$out/broker.pem" -days 825 -extfile "$out/broker.ext" 2>/dev/null
    rm -f "$out/broker.csr" "$out/broker.ext"
    chmod 0644 "$out/broker.pem"
}

# client_cert CADIR OUT NAME CN DAYS: OUT/NAME.{pem,key} (clientAuth) signed by CADIR's CA.
client_cert() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$2/$3.key" -out "$2/$3.csr" -subj "/O=FLUIDOS/CN=$4" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
        > "$2/$3.ext"
    openssl x509 -req -in "$2/$3.csr" -CA "$1/domain-ca.pem" -CAkey "$1/domain-ca.key" \
        -CAcreateserial -out "$2/$3.pem" -days "$5" -extfile "$2/$3.ext" 2>/dev/null
    rm -f "$2/$3.csr" "$2/$3.ext"
    chmod 0600 "$2/$3.key"; chmod 0644 "$2/$3.pem"
}

# render DIR DOMAIN PORT BIND: DIR/mosquitto.conf and DIR/acl from this folder's templates.
render() {
    abs=${INSTALL_DIR:-$(cd "$1" && pwd)}
    case "$abs" in /*) ;; *) die "INSTALL_DIR '$abs' is not an absolute path";; esac
    case "$abs" in *[!A-Za-z0-9._/-]*) die "path '$abs' has odd characters";; esac
    for f in mosquitto.conf acl; do
        sed -e "s|@DOMAIN@|$2|g" -e "s|@DIR@|$abs|g" -e "s|@PORT@|$3|g" \
            -e "s|@BIND@|$4|g" "$here/$f" > "$1/$f"
        chmod 0644 "$1/$f"
    done
}

# mosquitto drops privileges to its own user: give it the key by group, not by world.
give_to_mosquitto() {
    if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$1/broker.key" "$1/domain-ca.pem" "$1/broker.pem" "$1/acl" 2>/dev/null || true
        chgrp -R mosquitto "$1/data"; chmod 0770 "$1/data"; chmod 0640 "$1/broker.key"
    fi
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
    # The broker drops to the mosquitto user: it must reach the plugin and the config in
    # DIR whatever the caller's umask (077 left DIR 0700: "Unable to load auth plugin").
    # Keys are protected file by file below.
    chmod 0755 "$dir"
    build_plugin "$dir/fluidos_retain.so"
    umask 077
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/domain-ca.key" -out "$dir/domain-ca.pem" -days 3650 \
        -subj "/O=FLUIDOS/OU=$domain/CN=$domain domain CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    broker_cert "$dir" "$dir" "$domain" "$@"
    chmod 0644 "$dir/domain-ca.pem" "$dir/broker.pem"
    render "$dir" "$domain" "$port" "$bind"
    give_to_mosquitto "$dir"
    abs=${INSTALL_DIR:-$(cd "$dir" && pwd)}
    echo "domain $domain: CA $dir/domain-ca.pem, broker listening on $bind:$port (TLS)"
    echo "start it:  mosquitto -c $abs/mosquitto.conf"
    ;;
node)
    [ $# -ge 3 ] || die "usage: domain.sh node DIR NODE_ID [DAYS]"
    dir=$2; node=$3; days=${4:-825}
    valid_id "$node" || die "node id '$node': use A-Z a-z 0-9 . _ - (at most 48)"
    # ref-... ids are the reference nodes' buyers that supernodes speak as (refnode below):
    # no node may be enrolled under one.
    case "$node" in ref-*) die "node id '$node': ids starting with 'ref-' are kept for reference nodes (domain.sh refnode)";; esac
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
site)
    [ $# -ge 4 ] || die "usage: domain.sh site DIR SITE CORE_HOST[:CORE_PORT] [PORT [BIND [HOSTNAME...]]]"
    dir=$2; site=$3; core=$4; port=${5:-8883}; bind=${6:-0.0.0.0}
    shift 4; [ $# -gt 0 ] && shift; [ $# -gt 0 ] && shift
    valid_id "$site" || die "site '$site': use A-Z a-z 0-9 . _ - (at most 48)"
    case "$port" in ''|*[!0-9]*) die "port '$port' is not a number";; esac
    case "$core" in
        *:*) core_host=${core%:*}; core_port=${core##*:} ;;
        *) core_host=$core; core_port=8883 ;;
    esac
    case "$core_host" in ''|*[!A-Za-z0-9.-]*) die "core host '$core_host': a DNS name or an IPv4 address";; esac
    case "$core_port" in ''|*[!0-9]*) die "core port '$core_port' is not a number";; esac
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    [ -f "$dir/acl" ] && [ -f "$dir/mosquitto.conf" ] && [ -f "$dir/fluidos_retain.so" ] \
        || die "$dir is not a domain made by 'domain.sh init' (acl, mosquitto.conf, fluidos_retain.so)"
    domain=$(sed -n 's/^plugin_opt_domain \([A-Za-z0-9._-]*\)$/\1/p' "$dir/mosquitto.conf")
    valid_id "$domain" || die "no plugin_opt_domain line in $dir/mosquitto.conf"
    out="$dir/sites/$site"
    [ -e "$out" ] && die "$out exists: site names are unique in a domain"
    mkdir -p "$out/data"
    chmod 0755 "$dir/sites" "$out"   # as in init: the broker's user must reach them
    umask 077
    cp "$dir/domain-ca.pem" "$out/domain-ca.pem"; chmod 0644 "$out/domain-ca.pem"
    cp "$dir/fluidos_retain.so" "$out/fluidos_retain.so"; chmod 0755 "$out/fluidos_retain.so"
    broker_cert "$dir" "$out" "$domain" "$@"
    # The bridge's client certificate. Its CN has a ':', which valid_id (and so `node`)
    # never accepts: no node can be enrolled under a bridge's name.
    client_cert "$dir" "$out" bridge "bridge:$site" 825
    render "$out" "$domain" "$port" "$bind"
    abs=${INSTALL_DIR:-$(cd "$out" && pwd)}
    sed -e "s|@DOMAIN@|$domain|g" -e "s|@DIR@|$abs|g" -e "s|@SITE@|$site|g" \
        -e "s|@CORE@|$core_host:$core_port|g" "$here/bridge.conf" >> "$out/mosquitto.conf"
    if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$out/bridge.key" && chmod 0640 "$out/bridge.key"
    fi
    give_to_mosquitto "$out"
    printf '\n# Site %s (domain.sh site): its bridge carries the domain'"'"'s topics both ways.\nuser bridge:%s\ntopic readwrite fluidos/v1/%s/#\n' \
        "$site" "$site" "$domain" >> "$dir/acl"
    echo "site $site: $out (broker on $bind:$port, bridged to $core_host:$core_port)"
    echo "core: $dir/acl now lets bridge:$site carry fluidos/v1/$domain/#; reload it (kill -HUP the core's mosquitto)"
    echo "start the site:  mosquitto -c $abs/mosquitto.conf"
    ;;
supernode)
    [ $# -ge 3 ] || die "usage: domain.sh supernode DIR NAME [DAYS]"
    dir=$2; name=$3; days=${4:-825}
    valid_id "$name" || die "supernode '$name': use A-Z a-z 0-9 . _ - (at most 48)"
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    [ -f "$dir/acl" ] && [ -f "$dir/mosquitto.conf" ] || die "$dir is not a domain made by 'domain.sh init'"
    domain=$(sed -n 's/^plugin_opt_domain \([A-Za-z0-9._-]*\)$/\1/p' "$dir/mosquitto.conf")
    valid_id "$domain" || die "no plugin_opt_domain line in $dir/mosquitto.conf"
    out="$dir/supernodes/$name"
    [ -e "$out/supernode.pem" ] && die "$out/supernode.pem exists: supernode names are unique in a domain"
    mkdir -p "$out/refs"
    umask 077
    client_cert "$dir" "$out" supernode "supernode:$name" "$days"
    cp "$dir/domain-ca.pem" "$out/domain-ca.pem"; chmod 0644 "$out/domain-ca.pem"
    printf '\n# Supernode %s (domain.sh supernode): reads the catalog; mail both ways, narrowed by the\n# plugin to mail from and to ref- buyers (docs/supernode.md).\nuser supernode:%s\ntopic read fluidos/v1/%s/catalog/+\ntopic write fluidos/v1/%s/to/+/from/+\ntopic read fluidos/v1/%s/to/+/from/+\n' \
        "$name" "$name" "$domain" "$domain" "$domain" >> "$dir/acl"
    echo "supernode $name: $out/supernode.pem, $out/supernode.key, $out/domain-ca.pem"
    echo "$dir/acl now has user supernode:$name; reload the broker (kill -HUP its mosquitto)"
    ;;
refnode)
    [ $# -ge 4 ] || die "usage: domain.sh refnode DIR NAME LIQO_ID [DAYS]"
    dir=$2; name=$3; liqo=$4; days=${5:-825}
    case "$liqo" in ''|*[!A-Za-z0-9._-]*) die "Liqo cluster id '$liqo': use A-Z a-z 0-9 . _ -";; esac
    [ "${#liqo}" -le 128 ] || die "Liqo cluster id '$liqo' is longer than 128"
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    [ -f "$dir/supernodes/$name/supernode.pem" ] || die "no supernode $name: run 'domain.sh supernode $dir $name' first"
    id=$(ref_id "$liqo")
    out="$dir/supernodes/$name/refs/$id"
    [ -e "$out/node.pem" ] && die "$out/node.pem exists: reference node $liqo is already admitted"
    mkdir -p "$out"
    umask 077
    client_cert "$dir" "$out" node "$id" "$days"
    cp "$dir/domain-ca.pem" "$out/domain-ca.pem"; chmod 0644 "$out/domain-ca.pem"
    echo "reference node $liqo: buyer $id, $out/node.pem"
    ;;
*)
    sed -n '2,47p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
