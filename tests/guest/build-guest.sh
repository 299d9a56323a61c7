#!/bin/bash
# Build the test guest for vhost-agent's QEMU tests: a Debian kernel and an
# initramfs holding busybox, fio (with every library it links) and the virtio
# modules, with tests/guest/init as /init and tests/guest/udhcpc.script as
# udhcpc's default script.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initramfs.img and OUTDIR/stamp. Cached: when
# OUTDIR/stamp matches the inputs (kernel package and version, fio, busybox,
# the libraries, this script, init and udhcpc.script), it does nothing. Safe to run from
# several processes at once (flock on OUTDIR/.lock).
#
# Needs: apt-get, dpkg-deb, depmod/modprobe (kmod), busybox-static, fio, cpio,
# zstd: scripts/install-test-deps.sh installs them. Nothing is installed on
# the host: the kernel package is only downloaded and unpacked.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC="$here/init"
UDHCPC_SCRIPT="$here/udhcpc.script"
MODULES=(virtio virtio_ring virtio_pci virtio_pci_legacy_dev virtio_pci_modern_dev
    virtio_blk virtio_net failover net_failover)

log() { echo "build-guest: $*" >&2; }
die() {
    log "error: $*"
    log "(scripts/install-test-deps.sh installs the tools this script needs)"
    exit 1
}

[[ $# -eq 1 ]] || {
    echo "usage: $0 OUTDIR" >&2
    exit 2
}
mkdir -p "$1"
OUT=$(cd "$1" && pwd)

for tool in apt-get apt-cache dpkg-deb dpkg-query depmod modprobe cpio zstd ldd; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done
BUSYBOX=$(command -v busybox || true)
[[ -n "$BUSYBOX" ]] || die "busybox (busybox-static) is not installed"
FIO=$(command -v fio || true)
[[ -n "$FIO" ]] || die "fio is not installed"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked: install busybox-static"
fi

exec 9>"$OUT/.lock"
flock 9

# --- which kernel ---------------------------------------------------------
# The linux-image-6.1.0-*-amd64 package that the metapackage depends on (its
# candidate version in bookworm; backports is pinned below it by default).
meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null | sed -n 's/^Depends: //p' | head -n 1)
KPKG=$(sed -n 's/.*\(linux-image-6\.1\.0-[0-9]*-amd64\).*/\1/p' <<<"$meta")
if [[ -z "$KPKG" ]]; then
    # Package lists may be missing on a fresh machine; a cached build still works.
    if [[ -f "$OUT/stamp" && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.img" ]]; then
        log "apt-cache cannot resolve linux-image-amd64; keeping the cached guest"
        exit 0
    fi
    die "cannot resolve linux-image-amd64 to a linux-image-6.1.0-*-amd64 package (run apt-get update)"
fi
# The metapackage pins the exact version: "linux-image-6.1.0-N-amd64 (= V)".
KVER_PKG=$(sed -n "s/.*$KPKG (= \([^)]*\)).*/\1/p" <<<"$meta")
if [[ -z "$KVER_PKG" ]]; then
    KVER_PKG=$(apt-cache show --no-all-versions "$KPKG" | sed -n 's/^Version: //p' | head -n 1)
fi
KREL=${KPKG#linux-image-}

# --- cache key --------------------------------------------------------------
mapfile -t LIBS < <(ldd "$FIO" | sed -n 's/.*=> \(\/[^ ]*\) (0x.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p')
[[ ${#LIBS[@]} -gt 0 ]] || die "ldd $FIO listed no libraries"
key=$(
    {
        echo "kernel $KPKG $KVER_PKG"
        echo "modules ${MODULES[*]}"
        dpkg-query -W fio busybox-static libc6 2>/dev/null || true
        for f in "$FIO" "$BUSYBOX" "${LIBS[@]}"; do
            stat -L -c '%n %s %Y' "$f"
        done
        sha256sum "${BASH_SOURCE[0]}" "$INIT_SRC" "$UDHCPC_SCRIPT" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)
if [[ -f "$OUT/stamp" && "$(cat "$OUT/stamp")" == "$key" && -s "$OUT/vmlinuz" && -s "$OUT/initramfs.img" ]]; then
    log "up to date in $OUT ($KPKG $KVER_PKG)"
    exit 0
fi

start=$(date +%s)
log "building guest in $OUT ($KPKG $KVER_PKG)"
rm -f "$OUT/stamp"
work="$OUT/.work"
rm -rf "$work"
mkdir -p "$work" "$OUT/debs"

# --- kernel package ---------------------------------------------------------
deb_name="${KPKG}_${KVER_PKG//:/%3a}_amd64.deb"
deb="$OUT/debs/$deb_name"
if [[ ! -s "$deb" ]]; then
    if [[ -s "/var/cache/apt/archives/$deb_name" ]]; then
        cp "/var/cache/apt/archives/$deb_name" "$deb.tmp"
    else
        log "downloading $KPKG=$KVER_PKG"
        (cd "$work" && apt-get download "$KPKG=$KVER_PKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
            true
        dl=$(ls "$work"/linux-image-*.deb 2>/dev/null | head -n 1 || true)
        [[ -n "$dl" && -s "$dl" ]] || die "apt-get download $KPKG=$KVER_PKG failed"
        mv "$dl" "$deb.tmp"
    fi
    mv "$deb.tmp" "$deb"
    # Keep only the current kernel package.
    find "$OUT/debs" -name '*.deb' ! -name "$deb_name" -delete
fi
kroot="$work/kernel"
dpkg-deb -x "$deb" "$kroot"
vmlinuz="$kroot/boot/vmlinuz-$KREL"
[[ -f "$vmlinuz" ]] || die "$deb has no boot/vmlinuz-$KREL"
if [[ -d "$kroot/lib/modules/$KREL" ]]; then
    moddir="$kroot/lib/modules/$KREL"
elif [[ -d "$kroot/usr/lib/modules/$KREL" ]]; then
    moddir="$kroot/usr/lib/modules/$KREL"
else
    die "$deb has no modules for $KREL"
fi
depmod -b "${moddir%/lib/modules/$KREL}" "$KREL"

# --- initramfs tree ---------------------------------------------------------
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules,usr/bin,usr/sbin,root}

# busybox and its applets
cp "$BUSYBOX" "$rootfs/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ "$applet" == busybox ]] && continue
    [[ -e "$rootfs/bin/$applet" ]] || ln -s busybox "$rootfs/bin/$applet"
done

# fio, its libraries (at the paths ldd found them) and the ELF interpreter
mkdir -p "$rootfs/usr/bin"
cp -L "$FIO" "$rootfs/usr/bin/fio"
for lib in "${LIBS[@]}"; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
interp=$(sed -n 's/^[[:space:]]*\(\/[^ ]*ld-linux[^ ]*\) (0x.*/\1/p' < <(ldd "$FIO") | head -n 1)
[[ -n "$interp" && -e "$rootfs$interp" ]] || die "ELF interpreter of $FIO not found in ldd output"

# modules, in load order (modprobe --show-depends follows modules.dep)
: >"$rootfs/etc/modules.load"
declare -A seen=()
for m in "${MODULES[@]}"; do
    deps=$(modprobe -d "${moddir%/lib/modules/$KREL}" -S "$KREL" --show-depends "$m") ||
        die "module $m not found in $KPKG"
    while read -r kind path _; do
        case "$kind" in
        builtin)
            log "module $path is builtin"
            ;;
        insmod)
            rel=${path#"$moddir"/}
            name=$(basename "$rel")
            case "$name" in
            *.ko.xz) xz -dc "$path" >"$work/tmp.ko" ;;
            *.ko.zst) zstd -qdc "$path" >"$work/tmp.ko" ;;
            *.ko.gz) gzip -dc "$path" >"$work/tmp.ko" ;;
            *.ko) cp "$path" "$work/tmp.ko" ;;
            *) die "unexpected module file $path" ;;
            esac
            name=${name%.xz}
            name=${name%.zst}
            name=${name%.gz}
            if [[ -z "${seen[$name]:-}" ]]; then
                seen[$name]=1
                mv "$work/tmp.ko" "$rootfs/lib/modules/$name"
                echo "$name" >>"$rootfs/etc/modules.load"
            fi
            ;;
        esac
    done <<<"$deps"
done

install -m 0755 "$INIT_SRC" "$rootfs/init"
# busybox udhcpc's default event script (the net modes get their address by DHCP)
install -D -m 0755 "$UDHCPC_SCRIPT" "$rootfs/etc/udhcpc/default.script"
# The kernel opens /dev/console before /init runs.
mknod -m 600 "$rootfs/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$rootfs/dev/null" c 1 3 2>/dev/null || true

# Uncompressed-size note: fio links ~80 MiB of libraries (ceph, gluster...).
# zstd keeps the image small and decompresses fast even under TCG.
(cd "$rootfs" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) | zstd -q -T0 -3 -o "$work/initramfs.img"

mv "$work/initramfs.img" "$OUT/initramfs.img"
cp "$vmlinuz" "$OUT/vmlinuz"
echo "$KPKG $KVER_PKG" >"$OUT/kernel-version"
rm -rf "$work"
echo "$key" >"$OUT/stamp"
log "done in $(($(date +%s) - start)) s: $(du -h "$OUT/initramfs.img" | cut -f1) initramfs, kernel $KREL"
