#!/usr/bin/env bash
# Lets this host run ARM binaries and ARM container images under qemu: mounts binfmt_misc if
# needed and registers Debian's qemu-user-static handlers for aarch64 and arm (with the F
# flag their binfmt.d files carry, so the interpreter works inside containers too). Usually
# systemd-binfmt or binfmt-support does this at boot; machines without them (containers,
# chroots, CI sandboxes) need it done by hand. Runs as root; idempotent.
set -euo pipefail
dir=/proc/sys/fs/binfmt_misc
[ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir"
for arch in aarch64 arm; do
    conf=/usr/lib/binfmt.d/qemu-$arch.conf
    [ -f "$conf" ] || { echo "missing $conf: apt-get install qemu-user-static" >&2; exit 1; }
    [ -e "$dir/qemu-$arch" ] || grep -v '^#' "$conf" > "$dir/register"
    echo "qemu-$arch: $(head -n 1 "$dir/qemu-$arch") ($(grep ^flags "$dir/qemu-$arch"))"
done
