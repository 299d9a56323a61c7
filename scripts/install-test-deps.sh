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
#     iputils-ping (`ping`) to check such a network by hand.
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

missing_base=()
for p in "${BASE_PACKAGES[@]}"; do
    pkg_installed "$p" || missing_base+=("$p")
done
missing_dpdk=()
for p in "${DPDK_PACKAGES[@]}"; do
    pkg_installed "$p" || missing_dpdk+=("$p")
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

if $backports_ok && $lists_ok && qemu_ok && dpdk_ok &&
    [[ ${#missing_base[@]} -eq 0 && ${#missing_dpdk[@]} -eq 0 ]]; then
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

if ! qemu_ok; then
    log "QEMU >= $QEMU_MIN_MAJOR with qemu-storage-daemon is still missing after the install"
    exit 1
fi
if ! dpdk_ok; then
    log "dpdk-testpmd is still missing after installing ${DPDK_PACKAGES[*]}"
    exit 1
fi
log "done: $(qemu-system-x86_64 --version | head -n1); $(qemu-storage-daemon --version | head -n1); DPDK $(dpkg-query -W -f='${Version}' dpdk-dev)"
