#!/bin/bash
# A Debian trixie tree for what bookworm does not have: QEMU 11.1 (from
# trixie-backports, run through the tree's own loader) and the 6.12 kernel,
# iproute2's `vdpa` tool and DPDK 24.11 for the lab guest (downloaded inside
# the tree, never installed on the host).
#
#   scripts/trixie-tree.sh            # make sure the tree exists; print its path
#
# The tree lives at $VHOST_AGENT_TRIXIE (default /opt/vhost-agent/trixie).
# It is made once with debootstrap (about a minute), with deb822 sources for
# trixie and trixie-backports, and its package lists are refreshed when they
# are older than a day. Idempotent and safe to run from several processes at
# once (flock). Needs root the first time (debootstrap, chroot).
#
# Other scripts run commands inside it with trixie_chroot (source this file
# with TRIXIE_TREE_LIB=1 to get the functions without running anything).
set -euo pipefail

TRIXIE_ROOT=${VHOST_AGENT_TRIXIE:-/opt/vhost-agent/trixie}
TRIXIE_MIRROR=${VHOST_AGENT_TRIXIE_MIRROR:-http://deb.debian.org/debian}

trixie_log() { echo "trixie-tree: $*" >&2; }

# Run a command inside the tree with /proc, /dev and /sys mounted for its
# duration (apt needs /proc; dpkg maintainer scripts want /dev/null).
trixie_chroot() {
    local mounted=()
    local fs
    for fs in proc dev sys; do
        if ! mountpoint -q "$TRIXIE_ROOT/$fs"; then
            case $fs in
                proc) mount -t proc proc "$TRIXIE_ROOT/proc" ;;
                *) mount --bind "/$fs" "$TRIXIE_ROOT/$fs" ;;
            esac
            mounted+=("$TRIXIE_ROOT/$fs")
        fi
    done
    local rc=0
    DEBIAN_FRONTEND=noninteractive chroot "$TRIXIE_ROOT" "$@" || rc=$?
    local m
    for m in "${mounted[@]}"; do
        umount -l "$m" || true
    done
    return $rc
}

trixie_sources() {
    cat <<SRC
Types: deb
URIs: $TRIXIE_MIRROR
Suites: trixie trixie-updates trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

# Make the tree if it is missing, and refresh stale package lists.
trixie_ensure() {
    mkdir -p "$(dirname "$TRIXIE_ROOT")"
    exec 8>"$TRIXIE_ROOT.lock"
    flock 8
    if [[ ! -x "$TRIXIE_ROOT/usr/bin/apt-get" ]]; then
        [[ $(id -u) -eq 0 ]] || {
            trixie_log "creating $TRIXIE_ROOT needs root"
            return 1
        }
        if ! command -v debootstrap >/dev/null 2>&1; then
            trixie_log "installing debootstrap"
            apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends debootstrap >&2
        fi
        trixie_log "debootstrap trixie into $TRIXIE_ROOT"
        rm -rf "$TRIXIE_ROOT.partial"
        debootstrap --variant=minbase trixie "$TRIXIE_ROOT.partial" "$TRIXIE_MIRROR" >&2
        rm -f "$TRIXIE_ROOT.partial/etc/apt/sources.list"
        trixie_sources >"$TRIXIE_ROOT.partial/etc/apt/sources.list.d/debian.sources"
        rm -rf "$TRIXIE_ROOT"
        mv "$TRIXIE_ROOT.partial" "$TRIXIE_ROOT"
    fi
    if ! cmp -s "$TRIXIE_ROOT/etc/apt/sources.list.d/debian.sources" <(trixie_sources); then
        trixie_sources >"$TRIXIE_ROOT/etc/apt/sources.list.d/debian.sources"
        rm -f "$TRIXIE_ROOT/var/lib/apt/lists/"*_Packages* 2>/dev/null || true
    fi
    local stale=true
    if compgen -G "$TRIXIE_ROOT/var/lib/apt/lists/*trixie-backports_main_binary-amd64_Packages*" >/dev/null &&
        [[ -z $(find "$TRIXIE_ROOT/var/lib/apt/lists" -maxdepth 1 -name '*trixie_main_binary-amd64_Packages*' -mmin +1440 2>/dev/null) ]]; then
        stale=false
    fi
    if $stale; then
        trixie_log "apt-get update inside the tree"
        trixie_chroot apt-get -o Acquire::Retries=3 update >&2
    fi
    flock -u 8
}

if [[ -z "${TRIXIE_TREE_LIB:-}" ]]; then
    trixie_ensure
    echo "$TRIXIE_ROOT"
fi
