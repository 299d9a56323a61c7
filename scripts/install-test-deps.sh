#!/bin/bash
# Install what vhost-agent's end-to-end tests need on Debian bookworm:
#   * QEMU 10 (qemu-system-x86_64) and qemu-storage-daemon (package qemu-utils)
#     from bookworm-backports;
#   * the tools tests/guest/build-guest.sh uses to make the guest kernel and
#     initramfs: busybox-static, fio, cpio, kmod (depmod), zstd, dpkg, apt;
#   * DPDK 22.11 from bookworm: dpdk-testpmd (package dpdk-dev) and the
#     drivers the net tests load (vhost and virtio_user PMDs, tap, the ring
#     mempool), for tests/tests/net_dpdk.rs and benches/net_pps.rs;
#   * iproute2 (`ip`) for the net tests' namespace, bridge and taps, and
#     iputils-ping (`ping`) to check such a network by hand;
#   * for the lab guest (tests/lab/build-lab.sh, tests/src/lab.rs): xz to
#     unpack trixie's kernel modules and debootstrap for the trixie tree
#     (scripts/trixie-tree.sh) whose package lists the lab is built from.
#     The tree itself and the trixie packages are fetched by the lab build,
#     on first use, into /opt/vhost-agent/trixie and target/lab.
#   * QEMU 11.1 from trixie-backports inside the trixie tree of
#     scripts/trixie-tree.sh (bookworm's libc is too old for it), for the
#     vhost-user-blk `inflight-migration=on` tests (tests/tests/blk_qemu11.rs).
#
# Run as root. Idempotent: when everything is already there it returns in a
# fraction of a second without touching apt.
set -euo pipefail

BACKPORTS_FILE=/etc/apt/sources.list.d/backports.sources
QEMU_MIN_MAJOR=10
# Plain (non-backports) packages the guest build and the tests need.
BASE_PACKAGES=(busybox-static fio cpio kmod zstd dpkg apt libc-bin iproute2 iputils-ping)
# DPDK 22.11 (bookworm main). dpdk-dev carries dpdk-testpmd; the PMDs are
# separate packages that testpmd loads as plugins from the driver directory.
# Without recommends: dpdk-dev would otherwise pull in every PMD and kmod.
DPDK_PACKAGES=(dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-net-tap23 librte-mempool-ring23)
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
# The lab guest's build tools (tests/lab/build-lab.sh).
LAB_PACKAGES=(xz-utils debootstrap)

log() { echo "install-test-deps: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

# cargo-fuzz for scripts/fuzz.sh (fuzz/README.md), from crates.io with its
# locked dependencies; independent of the apt packages below.
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export DEBIAN_FRONTEND=noninteractive

backports_wanted() {
    cat <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

# Is package $1 installed (dpkg status "install ok installed")?
pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    command -v qemu-storage-daemon >/dev/null 2>&1 || return 1
    command -v qemu-img >/dev/null 2>&1 || return 1
    local version major
    version=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p')
    major=${version%%.*}
    [[ -n "$major" && "$major" -ge "$QEMU_MIN_MAJOR" ]] || return 1
    version=$(qemu-storage-daemon --version | sed -n 's/^qemu-storage-daemon version \([0-9][0-9.]*\).*/\1/p')
    major=${version%%.*}
    [[ -n "$major" && "$major" -ge "$QEMU_MIN_MAJOR" ]]
}

# --- QEMU 11.1 in the trixie tree (tests/src/qemu11.rs runs it through the
# tree's loader). Kept apart from the host packages above: it never touches
# the host's apt, and it is checked (binary present, version >= 11.1) before
# anything is done, so a ready tree costs a few milliseconds.
QEMU11_MIN=11.1
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
qemu11_version() {
    local root=$1
    [[ -x "$root/usr/bin/qemu-system-x86_64" && -e "$root/lib64/ld-linux-x86-64.so.2" ]] || return 1
    "$root/lib64/ld-linux-x86-64.so.2" \
        --library-path "$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" \
        "$root/usr/bin/qemu-system-x86_64" --version 2>/dev/null |
        sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p'
}
qemu11_ok() {
    local version
    version=$(qemu11_version "$1") || return 1
    [[ -n "$version" ]] && printf '%s\n%s\n' "$QEMU11_MIN" "$version" | sort -V -C
}
ensure_qemu11() {
    local root
    root=$(TRIXIE_TREE_LIB=1 && . "$SCRIPTS_DIR/trixie-tree.sh" && echo "$TRIXIE_ROOT")
    if qemu11_ok "$root"; then
        log "QEMU $(qemu11_version "$root") present in $root"
        return 0
    fi
    (
        TRIXIE_TREE_LIB=1
        . "$SCRIPTS_DIR/trixie-tree.sh"
        trixie_ensure
        log "installing QEMU from trixie-backports into $TRIXIE_ROOT"
        trixie_chroot apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 install -y \
            --no-install-recommends -t trixie-backports qemu-system-x86 qemu-utils
    )
    if ! qemu11_ok "$root"; then
        log "QEMU >= $QEMU11_MIN is still missing in $root after the install (found: $(qemu11_version "$root" || echo nothing))"
        return 1
    fi
    log "QEMU $(qemu11_version "$root") installed in $root"
}

missing_base=()
for p in "${BASE_PACKAGES[@]}"; do
    pkg_installed "$p" || missing_base+=("$p")
done
missing_dpdk=()
for p in "${DPDK_PACKAGES[@]}"; do
    pkg_installed "$p" || missing_dpdk+=("$p")
done
missing_lab=()
for p in "${LAB_PACKAGES[@]}"; do
    pkg_installed "$p" || missing_lab+=("$p")
done

backports_ok=false
if [[ -f "$BACKPORTS_FILE" ]] && cmp -s "$BACKPORTS_FILE" <(backports_wanted); then
    backports_ok=true
fi

# tests/guest/build-guest.sh asks apt which kernel package to download, so
# the package lists must be there too (images often ship without them).
lists_ok=false
if compgen -G '/var/lib/apt/lists/*_dists_bookworm_main_binary-amd64_Packages*' >/dev/null &&
    compgen -G '/var/lib/apt/lists/*_dists_bookworm-backports_main_binary-amd64_Packages*' >/dev/null; then
    lists_ok=true
fi

# The packages can be installed while the binary is not where the tests
# look for it (a diverted or removed file): check the command too.
dpdk_ok() {
    command -v dpdk-testpmd >/dev/null 2>&1
}

ensure_qemu11

if $backports_ok && $lists_ok && qemu_ok && dpdk_ok &&
    [[ ${#missing_base[@]} -eq 0 && ${#missing_dpdk[@]} -eq 0 && ${#missing_lab[@]} -eq 0 ]]; then
    log "all test dependencies present: $(qemu-system-x86_64 --version | head -n1); DPDK $(dpkg-query -W -f='${Version}' dpdk-dev)"
    exit 0
fi

if ! $backports_ok; then
    log "writing $BACKPORTS_FILE"
    backports_wanted >"$BACKPORTS_FILE"
fi
# Something is missing: refresh the package lists first (a fresh machine may
# have none, and old ones may name versions the mirror no longer has).
log "apt-get update"
apt-get "${APT_OPTS[@]}" update

if ! qemu_ok; then
    log "installing QEMU from bookworm-backports"
    # With recommends: ipxe-qemu (option ROMs for NIC devices) comes with them.
    apt-get "${APT_OPTS[@]}" install -y -t bookworm-backports qemu-system-x86 qemu-utils
fi

if [[ ${#missing_base[@]} -gt 0 ]]; then
    log "installing ${missing_base[*]}"
    apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${missing_base[@]}"
fi

if [[ ${#missing_dpdk[@]} -gt 0 ]] || ! dpdk_ok; then
    # All of them when the command is missing: reinstalling puts it back.
    log "installing DPDK 22.11: ${DPDK_PACKAGES[*]}"
    apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${DPDK_PACKAGES[@]}"
fi

if [[ ${#missing_lab[@]} -gt 0 ]]; then
    log "installing the lab guest's build tools: ${missing_lab[*]}"
    apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${missing_lab[@]}"
fi

if ! qemu_ok; then
    log "QEMU >= $QEMU_MIN_MAJOR with qemu-storage-daemon is still missing after the install"
    exit 1
fi
if ! dpdk_ok; then
    log "dpdk-testpmd is still missing after installing ${DPDK_PACKAGES[*]}"
    exit 1
fi
log "done: $(qemu-system-x86_64 --version | head -n1); $(qemu-storage-daemon --version | head -n1); DPDK $(dpkg-query -W -f='${Version}' dpdk-dev)"
