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
#   domain.sh revoke DIR NODE_ID
#       Revokes every certificate minted for NODE_ID (DIR/nodes/NODE_ID/node.pem), re-signs
#       the certificate revocation list DIR/crl.pem (the broker's `crlfile`) and adds NODE_ID
#       to DIR/revoked (read by the plugin, which cuts the node's live session off and clears
#       its catalog entry). Needs DIR/domain-ca.key. Then reload the broker: kill -HUP it, and
#       copy crl.pem and revoked to every site broker and reload it too (docs/security.md).
#   domain.sh list DIR
#       One line per certificate minted for a node: node id, serial, expiry, and whether it
#       is valid, expired or revoked.
#   domain.sh crl DIR [DAYS]
#       Re-signs DIR/crl.pem (valid DAYS, 3650 by default). A CRL past its next-update time
#       makes the broker refuse every node: re-sign it before then.
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

# The revocation state of a domain, kept with `openssl ca`: DIR/ca/index.txt (the serials
# revoked), DIR/ca/crlnumber, and the CRL DIR/crl.pem signed by the domain CA. Node
# certificates are still minted with `openssl x509 -req` (`node`); `openssl ca -revoke` adds
# a certificate it has not seen to its index as it revokes it. ca_conf DIR writes the
# openssl config for DIR's paths as they are now (DIR may have moved since init).
ca_conf() {
    d=$(cd "$1" && pwd)
    mkdir -p "$d/ca"
    [ -e "$d/ca/index.txt" ] || : > "$d/ca/index.txt"
    # Several certificates of one node (one revoked, one re-minted) share a subject.
    [ -e "$d/ca/index.txt.attr" ] || echo "unique_subject = no" > "$d/ca/index.txt.attr"
    [ -e "$d/ca/crlnumber" ] || echo 1000 > "$d/ca/crlnumber"
    printf '[ca]\ndefault_ca = domain\n[domain]\ndatabase = %s\ncrlnumber = %s\ncertificate = %s\nprivate_key = %s\ndefault_md = sha256\nunique_subject = no\ndefault_crl_days = %s\n' \
        "$d/ca/index.txt" "$d/ca/crlnumber" "$d/domain-ca.pem" "$d/domain-ca.key" "${2:-3650}" \
        > "$d/ca/openssl.cnf"
    echo "$d/ca/openssl.cnf"
}

# gen_crl DIR [DAYS]: re-signs DIR/crl.pem from DIR/ca/index.txt.
gen_crl() {
    [ -r "$1/domain-ca.key" ] || die "$1/domain-ca.key not found: the CRL is signed by the domain CA (bring the key back)"
    cnf=$(ca_conf "$1" "${2:-3650}")
    openssl ca -config "$cnf" -gencrl -out "$1/crl.pem.new" 2>/dev/null \
        || die "openssl ca -gencrl failed"
    chmod 0644 "$1/crl.pem.new"
    mv "$1/crl.pem.new" "$1/crl.pem"
    [ -e "$1/revoked" ] || { : > "$1/revoked"; chmod 0644 "$1/revoked"; }
}

# The serial of a certificate, upper-case hex as openssl's index writes it.
serial_of() { openssl x509 -in "$1" -noout -serial | sed 's/^serial=//'; }

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
        chgrp mosquitto "$1/broker.key" "$1/domain-ca.pem" "$1/broker.pem" "$1/acl" \
            "$1/crl.pem" "$1/revoked" 2>/dev/null || true
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
    gen_crl "$dir"
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
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    out="$dir/nodes/$node"
    [ -e "$out/node.pem" ] && die "$out/node.pem exists: node ids are unique in a domain"
    grep -qx "$node" "$dir/revoked" 2>/dev/null && die "node id '$node' was revoked: a revoked id is retired, enrol the device under a new id"
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
revoke)
    [ $# -ge 3 ] || die "usage: domain.sh revoke DIR NODE_ID"
    dir=$2; node=$3
    valid_id "$node" || die "node id '$node': use A-Z a-z 0-9 . _ - (at most 48)"
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: revoking signs a new CRL with the domain CA (bring the key back)"
    found=0
    for cert in "$dir/nodes/$node"/node.pem "$dir/nodes/$node"/issued/*.pem; do
        [ -f "$cert" ] || continue
        found=1
        serial=$(serial_of "$cert")
        if grep -q "^R	[^	]*	[^	]*	$serial	" "$dir/ca/index.txt" 2>/dev/null; then
            echo "node $node: certificate $serial was already revoked"
            continue
        fi
        cnf=$(ca_conf "$dir")
        openssl ca -config "$cnf" -revoke "$cert" -crl_reason cessationOfOperation 2>/dev/null \
            || die "openssl ca -revoke $cert failed"
        echo "node $node: certificate $serial revoked"
    done
    [ "$found" = 1 ] || die "no certificate of node '$node' in $dir/nodes/$node"
    gen_crl "$dir"
    grep -qx "$node" "$dir/revoked" || echo "$node" >> "$dir/revoked"
    give_to_mosquitto "$dir"
    echo "CRL $dir/crl.pem re-signed; reload the broker (kill -HUP its mosquitto) to refuse $node and cut it off;"
    echo "copy $dir/crl.pem and $dir/revoked to every site broker and reload it too"
    ;;
list)
    [ $# -ge 2 ] || die "usage: domain.sh list DIR"
    dir=$2
    [ -d "$dir/nodes" ] || die "$dir is not a domain made by 'domain.sh init' (no nodes/)"
    printf 'node\tserial\tnot_after\tstatus\n'
    for cert in "$dir"/nodes/*/node.pem "$dir"/nodes/*/issued/*.pem; do
        [ -f "$cert" ] || continue
        node=$(openssl x509 -in "$cert" -noout -subject -nameopt multiline | sed -n 's/^ *commonName *= //p')
        serial=$(serial_of "$cert")
        end=$(openssl x509 -in "$cert" -noout -enddate | sed 's/^notAfter=//')
        status=valid
        if grep -q "^R	[^	]*	[^	]*	$serial	" "$dir/ca/index.txt" 2>/dev/null; then
            status=revoked
        elif ! openssl x509 -in "$cert" -noout -checkend 0 >/dev/null; then
            status=expired
        fi
        printf '%s\t%s\t%s\t%s\n' "$node" "$serial" "$end" "$status"
    done
    ;;
crl)
    [ $# -ge 2 ] || die "usage: domain.sh crl DIR [DAYS]"
    days=${3:-3650}
    case "$days" in ''|*[!0-9]*) die "days '$days' is not a number";; esac
    gen_crl "$2" "$days"
    give_to_mosquitto "$2"
    echo "CRL $2/crl.pem re-signed, valid $days days; reload the broker (kill -HUP)"
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
    # A site refuses the same revoked nodes as its core (copy both again after a revoke).
    [ -e "$dir/crl.pem" ] || gen_crl "$dir"
    cp "$dir/crl.pem" "$dir/revoked" "$out/"; chmod 0644 "$out/crl.pem" "$out/revoked"
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
*)
    sed -n '2,47p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
