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
#   domain.sh token DIR NODE_ID|PREFIX* [TTL_SECS [USES]]
#       Mints a one-time enrolment token for fluidlet-signer, bound to NODE_ID (used once) or
#       to every id starting with PREFIX (USES ids, each once), expiring after TTL_SECS (86400
#       by default). Prints the token (64 hex digits) once; DIR/enrol/tokens keeps only its
#       SHA-256. Put it in the gateway's token file ([enrol] token, docs/operations.md).
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
#   domain.sh refprovider DIR NAME ENDPOINT [DAYS]
#       Lets supernode NAME sell the flavours of the reference node whose REAR gateway is
#       ENDPOINT (HOST:PORT) into the domain (outbound): mints
#       DIR/supernodes/NAME/providers/ID/node.{pem,key} with CN
#       ID = ref-{first 32 hex digits of SHA-256("provider:" ENDPOINT)}, the provider id the
#       supernode speaks as for it. It is an ordinary node certificate: the broker lets it
#       write only its own catalog entry and mail from ID, and read only mail to ID.
#
# INSTALL_DIR: the path the directory will have on the broker host (init: DIR; site:
# DIR/sites/SITE), written into its mosquitto.conf; by default where it is made.
# Keys are EC P-256. DIR/domain-ca.key signs every node: keep it offline once the
# domain is set up (move it away and bring it back to enrol a node or a site).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "domain.sh: $*" >&2; exit 2; }
# DAYS arguments: a whole number of days, 1 to 36500 (0 would mint a certificate that is
# already expired; openssl takes a negative or non-numeric one as an error, after the key).
valid_days() {
    case "$1" in ''|*[!0-9]*) die "DAYS '$1': a whole number of days, 1 to 36500";; esac
    [ "$1" -ge 1 ] && [ "$1" -le 36500 ] || die "DAYS '$1': a whole number of days, 1 to 36500"
}
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

# The revocation state of a domain, kept with `openssl ca` for each of its two CAs: the
# domain CA (state in DIR/ca, CRL DIR/ca/crl.pem) and the enrolment CA that fluidlet-signer
# signs with (DIR/enrol/ca, DIR/enrol/ca/crl.pem). DIR/crl.pem, the broker's `crlfile`, is
# the two CRLs one after the other: OpenSSL needs a CRL for the issuer of every client
# certificate. Node certificates are minted with `openssl x509 -req` (`node`) or by the
# signer; `openssl ca -revoke` adds a certificate it has not seen to its index as it revokes
# it. ca_conf STATE CERT KEY [DAYS] writes the openssl config for these paths as they are now
# (DIR may have moved since init) and prints its path.
ca_conf() {
    mkdir -p "$1"; chmod 0700 "$1"
    st=$(cd "$1" && pwd)
    [ -e "$st/index.txt" ] || : > "$st/index.txt"
    # Several certificates of one node (one revoked, one re-minted) share a subject.
    [ -e "$st/index.txt.attr" ] || echo "unique_subject = no" > "$st/index.txt.attr"
    [ -e "$st/crlnumber" ] || echo 1000 > "$st/crlnumber"
    printf '[ca]\ndefault_ca = domain\n[domain]\ndatabase = %s\ncrlnumber = %s\ncertificate = %s\nprivate_key = %s\ndefault_md = sha256\nunique_subject = no\ndefault_crl_days = %s\n' \
        "$st/index.txt" "$st/crlnumber" "$2" "$3" "${4:-3650}" > "$st/openssl.cnf"
    echo "$st/openssl.cnf"
}

# ca_of DIR CERT: "root" or "enrol", the CA that issued CERT.
ca_of() {
    if [ -f "$1/enrol/enrol-ca.pem" ] && [ "$(openssl x509 -in "$2" -noout -issuer -nameopt RFC2253)" = \
        "issuer=$(openssl x509 -in "$1/enrol/enrol-ca.pem" -noout -subject -nameopt RFC2253 | sed 's/^subject=//')" ]; then
        echo enrol
    else
        echo root
    fi
}

# ca_args DIR WHICH: the state directory, certificate and key of the root or enrolment CA.
ca_args() {
    case "$2" in
        enrol) echo "$1/enrol/ca $1/enrol/enrol-ca.pem $1/enrol/enrol-ca.key" ;;
        *) echo "$1/ca $1/domain-ca.pem $1/domain-ca.key" ;;
    esac
}

# gen_crl DIR WHICH [DAYS]: re-signs the CRL of one CA (root or enrol; only its key is
# needed) and rebuilds DIR/crl.pem from both.
gen_crl() {
    # shellcheck disable=SC2046
    set -- "$1" "$2" "${3:-3650}" $(ca_args "$1" "$2")
    [ -r "$6" ] || die "$6 not found: the $2 CA's CRL is signed with it (bring the key back)"
    cnf=$(ca_conf "$4" "$5" "$6" "$3")
    openssl ca -config "$cnf" -gencrl -out "$4/crl.pem" 2>/dev/null \
        || die "openssl ca -gencrl ($2 CA) failed"
    cat "$1/ca/crl.pem" > "$1/crl.pem.new"
    [ -f "$1/enrol/ca/crl.pem" ] && cat "$1/enrol/ca/crl.pem" >> "$1/crl.pem.new"
    chmod 0644 "$1/crl.pem.new"
    mv "$1/crl.pem.new" "$1/crl.pem"
    [ -e "$1/revoked" ] || { : > "$1/revoked"; chmod 0644 "$1/revoked"; }
}

# The serial of a certificate, upper-case hex as openssl's index writes it.
serial_of() { openssl x509 -in "$1" -noout -serial | sed 's/^serial=//'; }

# enrol_ca DIR DOMAIN: the enrolment CA (DIR/enrol/enrol-ca.{pem,key}), an intermediate of
# the domain CA that may sign node certificates only (pathlen 0), for fluidlet-signer; and
# DIR/ca-bundle.pem (domain CA + enrolment CA), the CA file gateways are given.
enrol_ca() {
    mkdir -p "$1/enrol"; chmod 0700 "$1/enrol"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$1/enrol/enrol-ca.key" -out "$1/enrol/enrol-ca.csr" \
        -subj "/O=FLUIDOS/OU=$2/CN=$2 enrolment CA" 2>/dev/null
    printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n' \
        > "$1/enrol/enrol-ca.ext"
    openssl x509 -req -in "$1/enrol/enrol-ca.csr" -CA "$1/domain-ca.pem" -CAkey "$1/domain-ca.key" \
        -CAcreateserial -out "$1/enrol/enrol-ca.pem" -days 3650 -extfile "$1/enrol/enrol-ca.ext" 2>/dev/null
    rm -f "$1/enrol/enrol-ca.csr" "$1/enrol/enrol-ca.ext"
    chmod 0600 "$1/enrol/enrol-ca.key"; chmod 0644 "$1/enrol/enrol-ca.pem"
    : > "$1/enrol/tokens"; : > "$1/enrol/used"; chmod 0600 "$1/enrol/tokens" "$1/enrol/used"
    cat "$1/domain-ca.pem" "$1/enrol/enrol-ca.pem" > "$1/ca-bundle.pem"; chmod 0644 "$1/ca-bundle.pem"
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
        -addext "basicConstraints=critical,CA:TRUE,pathlen:1" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    broker_cert "$dir" "$dir" "$domain" "$@"
    chmod 0644 "$dir/domain-ca.pem" "$dir/broker.pem"
    enrol_ca "$dir" "$domain"
    gen_crl "$dir" root
    gen_crl "$dir" enrol
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
    valid_days "$days"
    # ref-... ids are the reference nodes' buyers that supernodes speak as (refnode below):
    # no node may be enrolled under one.
    case "$node" in ref-*) die "node id '$node': ids starting with 'ref-' are kept for reference nodes (domain.sh refnode)";; esac
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    out="$dir/nodes/$node"
    [ -e "$out/node.pem" ] && die "$out/node.pem exists: node ids are unique in a domain"
    grep -qx "$node" "$dir/revoked" 2>/dev/null && die "node id '$node' was revoked: a revoked id is retired, enrol the device under a new id"
    mkdir -p "$out"
    umask 077
    # Nothing half-made is left behind: a failed step removes what this run wrote.
    undo() { rm -f "$out/node.key" "$out/node.csr" "$out/node.ext" "$out/node.pem"; die "$1"; }
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out/node.key" -out "$out/node.csr" -subj "/O=FLUIDOS/CN=$node" 2>/dev/null \
        || undo "openssl could not make the key and request for $node"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' \
        > "$out/node.ext"
    openssl x509 -req -in "$out/node.csr" -CA "$dir/domain-ca.pem" -CAkey "$dir/domain-ca.key" \
        -CAcreateserial -out "$out/node.pem" -days "$days" -extfile "$out/node.ext" 2>/dev/null \
        || undo "openssl could not sign the certificate of $node with $dir/domain-ca.key"
    rm -f "$out/node.csr" "$out/node.ext"
    # With an enrolment CA, the bundle: sealed peering checks other nodes' certificates,
    # some of which the enrolment CA signed.
    if [ -f "$dir/ca-bundle.pem" ]; then cp "$dir/ca-bundle.pem" "$out/domain-ca.pem"; else cp "$dir/domain-ca.pem" "$out/domain-ca.pem"; fi
    chmod 0600 "$out/node.key"; chmod 0644 "$out/node.pem" "$out/domain-ca.pem"
    echo "node $node: $out/node.pem, $out/node.key, $out/domain-ca.pem"
    ;;
revoke)
    [ $# -ge 3 ] || die "usage: domain.sh revoke DIR NODE_ID"
    dir=$2; node=$3
    valid_id "$node" || die "node id '$node': use A-Z a-z 0-9 . _ - (at most 48)"
    found=0; resign=""
    # Named as revoked first: the signer refuses a renewal of a revoked id, so none slips in
    # while the certificates below are revoked one by one.
    if [ -d "$dir/nodes/$node" ]; then
        grep -qx "$node" "$dir/revoked" 2>/dev/null || echo "$node" >> "$dir/revoked"
    fi
    for cert in "$dir/nodes/$node"/node.pem "$dir/nodes/$node"/issued/*.pem; do
        [ -f "$cert" ] || continue
        found=1
        serial=$(serial_of "$cert")
        which=$(ca_of "$dir" "$cert")
        # shellcheck disable=SC2046
        set -- $(ca_args "$dir" "$which")
        [ -r "$3" ] || die "$3 not found: revoking $cert signs a new CRL with the $which CA's key (bring it back)"
        if grep -q "^R	[^	]*	[^	]*	$serial	" "$1/index.txt" 2>/dev/null; then
            echo "node $node: certificate $serial was already revoked"
            continue
        fi
        cnf=$(ca_conf "$1" "$2" "$3")
        openssl ca -config "$cnf" -revoke "$cert" -crl_reason cessationOfOperation 2>/dev/null \
            || die "openssl ca -revoke $cert failed"
        echo "node $node: certificate $serial revoked"
        case " $resign " in *" $which "*) ;; *) resign="$resign $which";; esac
    done
    [ "$found" = 1 ] || die "no certificate of node '$node' in $dir/nodes/$node"
    for which in $resign; do gen_crl "$dir" "$which"; done
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
        if grep -q "^R	[^	]*	[^	]*	$serial	" "$dir/ca/index.txt" "$dir/enrol/ca/index.txt" 2>/dev/null; then
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
    [ -r "$2/domain-ca.key" ] && gen_crl "$2" root "$days"
    [ -r "$2/enrol/enrol-ca.key" ] && gen_crl "$2" enrol "$days"
    give_to_mosquitto "$2"
    echo "CRL $2/crl.pem re-signed, valid $days days; reload the broker (kill -HUP)"
    ;;
token)
    [ $# -ge 3 ] || die "usage: domain.sh token DIR NODE_ID|PREFIX* [TTL_SECS [USES]]"
    dir=$2; bind=$3; ttl=${4:-86400}; uses=${5:-1}
    case "$bind" in
        *'*') valid_id "${bind%\*}" || die "prefix '$bind': an id prefix then '*'" ;;
        *) valid_id "$bind" || die "node id '$bind': use A-Z a-z 0-9 . _ - (at most 48)"
           [ "$uses" = 1 ] || die "a token for one node id is used once (USES is for a prefix)" ;;
    esac
    case "$ttl$uses" in ''|*[!0-9]*) die "TTL and USES are numbers";; esac
    [ "$uses" -ge 1 ] || die "USES is at least 1"
    [ -f "$dir/enrol/tokens" ] || die "$dir/enrol/tokens not found: a domain made by 'domain.sh init' with an enrolment CA"
    grep -qx "${bind%\*}" "$dir/revoked" 2>/dev/null && die "node id '$bind' was revoked"
    token=$(openssl rand -hex 32)
    hash=$(printf '%s' "$token" | openssl dgst -sha256 -r | cut -d' ' -f1)
    expires=$(( $(date +%s) + ttl ))
    printf '%s %s %s %s\n' "$hash" "$bind" "$expires" "$uses" >> "$dir/enrol/tokens"
    # Only the hash is kept; the token is printed once, for the gateway's token file.
    echo "$token"
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
    [ -e "$dir/crl.pem" ] || gen_crl "$dir" root
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
refprovider)
    [ $# -ge 4 ] || die "usage: domain.sh refprovider DIR NAME ENDPOINT [DAYS]"
    dir=$2; name=$3; endpoint=$4; days=${5:-825}
    valid_days "$days"
    case "$endpoint" in *:*) ;; *) die "endpoint '$endpoint': HOST:PORT of the reference node's REAR gateway";; esac
    case "$endpoint" in *[!A-Za-z0-9.:\[\]-]*|:*|*:) die "endpoint '$endpoint': HOST:PORT of the reference node's REAR gateway";; esac
    [ "${#endpoint}" -le 255 ] || die "endpoint '$endpoint' is longer than 255"
    [ -r "$dir/domain-ca.key" ] || die "$dir/domain-ca.key not found: run 'domain.sh init' (or bring the CA key back)"
    [ -f "$dir/supernodes/$name/supernode.pem" ] || die "no supernode $name: run 'domain.sh supernode $dir $name' first"
    h=$(printf 'provider:%s' "$endpoint" | openssl dgst -sha256 -r | cut -c1-32)
    [ "${#h}" -eq 32 ] || die "openssl dgst -sha256 failed"
    id="ref-$h"
    grep -qx "$id" "$dir/revoked" 2>/dev/null && die "provider id '$id' was revoked"
    out="$dir/supernodes/$name/providers/$id"
    [ -e "$out/node.pem" ] && die "$out/node.pem exists: reference node $endpoint is already sold from"
    mkdir -p "$out"
    umask 077
    client_cert "$dir" "$out" node "$id" "$days"
    cp "$dir/domain-ca.pem" "$out/domain-ca.pem"; chmod 0644 "$out/domain-ca.pem"
    echo "reference node at $endpoint: provider $id, $out/node.pem"
    ;;
*)
    sed -n '2,71p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
