#!/bin/bash
# Build the lab guest: a Debian trixie 6.12 kernel that has vhost-net,
# vhost-vdpa and VDUSE (this host's kernel has none of them), and a base
# initramfs with busybox, dash as /bin/sh, iproute2's `ip` and `vdpa`,
# trixie's libc and
# loader, the vhost/vDPA/VDUSE/tun modules and tests/lab/init as /init.
# Tests append a per-run cpio archive (their payload) to the base image;
# see tests/src/lab.rs.
#
#   tests/lab/build-lab.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initramfs.img (zstd, padded to 512 bytes
# so an uncompressed archive can follow), OUTDIR/base-libs (the sonames the
# base image holds in /usr/lib/x86_64-linux-gnu: a payload brings only the
# libraries missing there), OUTDIR/kernel-version and OUTDIR/stamp.
#
# Cached: when OUTDIR/stamp matches the inputs (the trixie package versions,
# the module list, this script and init) it does nothing. Safe to run from
# several processes at once (flock on OUTDIR/.lock). tests/lab/lib.sh becomes
# /etc/lab/lib.sh, helpers for payload scripts.
#
# Every package comes from Debian trixie through the package lists of the
# trixie tree (scripts/trixie-tree.sh), read with a private apt
# configuration: packages are downloaded into OUTDIR/debs and unpacked with
# dpkg-deb, never installed (neither on the host nor in the tree).
#
# Needs: apt-get, apt-cache, dpkg-deb, depmod/modprobe (kmod), xz, zstd,
# cpio, flock: scripts/install-test-deps.sh installs them. Root is needed
# only to create the trixie tree or refresh its package lists.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
INIT_SRC="$here/init"
LIB_SRC="$here/lib.sh"
# Modules /init loads at boot, each after its dependencies (modules.dep).
# virtio_vdpa is left out on purpose: with it absent a vDPA device binds to
# vhost_vdpa and becomes /dev/vhost-vdpa-N.
MODULES=(vhost_iotlb vhost vhost_net tun vdpa vduse vhost_vdpa)
# Binaries the base image carries besides busybox, at the same paths: trixie's
# iproute2 `ip` and `vdpa`, and dash as /bin/sh. Debian's busybox shells run
# their own applets in preference to PATH (FEATURE_SH_STANDALONE), so under
# busybox sh `ip` would be the applet, not iproute2.
EXTRA_BINS=(usr/bin/ip usr/sbin/vdpa usr/bin/dash)
# Root packages; their library dependencies are added by apt-cache depends.
ROOT_PACKAGES=(busybox-static iproute2 dash libc6 libgcc-s1)
MULTIARCH=x86_64-linux-gnu

log() { echo "build-lab: $*" >&2; }
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

for tool in apt-get apt-cache dpkg-deb depmod modprobe xz zstd cpio flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool"
done

exec 9>"$OUT/.lock"
flock 9

# --- the trixie tree's package lists ----------------------------------------
# shellcheck source=../../scripts/trixie-tree.sh
TRIXIE_TREE_LIB=1 . "$repo/scripts/trixie-tree.sh"
if [[ $(id -u) -eq 0 ]]; then
    trixie_ensure || die "cannot prepare the trixie tree at $TRIXIE_ROOT"
elif ! compgen -G "$TRIXIE_ROOT/var/lib/apt/lists/*_dists_trixie_main_binary-amd64_Packages*" >/dev/null; then
    if [[ -f "$OUT/stamp" && -s "$OUT/vmlinuz" && -s "$OUT/initramfs.img" ]]; then
        log "no trixie tree at $TRIXIE_ROOT and not root; keeping the cached lab"
        exit 0
    fi
    die "no trixie package lists in $TRIXIE_ROOT: run this once as root (or scripts/trixie-tree.sh)"
fi

# A private apt configuration: the tree's lists, nothing installed, caches
# under OUTDIR. Backports keep apt's default priority (100), so candidates
# are trixie's own versions.
aptdir="$OUT/.apt"
mkdir -p "$aptdir/cache" "$aptdir/state"
: >"$aptdir/status"
cat >"$aptdir/apt.conf" <<EOF
Dir::State "$aptdir/state";
Dir::State::Lists "$TRIXIE_ROOT/var/lib/apt/lists";
Dir::State::status "$aptdir/status";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$TRIXIE_ROOT/etc/apt/sources.list.d";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::Cache "$aptdir/cache";
APT::Architecture "amd64";
APT::Sandbox::User "root";
Debug::NoLocking "true";
EOF
export APT_CONFIG="$aptdir/apt.conf"

# --- which packages -----------------------------------------------------------
# linux-image-amd64 pins its kernel: "Depends: linux-image-6.12.N+deb13-amd64 (= V)".
meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null | sed -n 's/^Depends: //p' | head -n 1)
KPKG=$(sed -n 's/.*\(linux-image-6\.12\.[^ ,]*-amd64\).*/\1/p' <<<"$meta")
[[ -n "$KPKG" ]] || die "trixie's linux-image-amd64 does not name a linux-image-6.12.*-amd64 package (Depends: $meta)"
KREL=${KPKG#linux-image-}

mapfile -t LIB_PACKAGES < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances "${ROOT_PACKAGES[@]}" 2>/dev/null | grep -E '^lib[^ <>]*$' | sort -u)
[[ ${#LIB_PACKAGES[@]} -gt 0 ]] || die "apt-cache depends found no libraries for ${ROOT_PACKAGES[*]}"
mapfile -t WANTED < <(printf '%s\n' "$KPKG" "${ROOT_PACKAGES[@]}" "${LIB_PACKAGES[@]}" | sort -u)
mapfile -t PINNED < <(apt-cache show --no-all-versions "${WANTED[@]}" 2>/dev/null |
    awk '/^Package: /{p=$2} /^Version: /{print p "=" $2}' | sort -u)
[[ ${#PINNED[@]} -eq ${#WANTED[@]} ]] ||
    die "apt-cache show resolved ${#PINNED[@]} of ${#WANTED[@]} packages: ${PINNED[*]}"

# --- cache key --------------------------------------------------------------
key=$(
    {
        printf '%s\n' "${PINNED[@]}"
        echo "modules ${MODULES[*]}"
        echo "bins ${EXTRA_BINS[*]}"
        sha256sum "${BASH_SOURCE[0]}" "$INIT_SRC" "$LIB_SRC" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)
if [[ -f "$OUT/stamp" && "$(cat "$OUT/stamp")" == "$key" && -s "$OUT/vmlinuz" && -s "$OUT/initramfs.img" ]]; then
    log "up to date in $OUT ($KPKG)"
    exit 0
fi

start=$(date +%s)
log "building the lab guest in $OUT ($KPKG)"
rm -f "$OUT/stamp"
work="$OUT/.work"
rm -rf "$work"
mkdir -p "$work" "$OUT/debs"

# --- download -----------------------------------------------------------------
deb_path() { # deb_path PKG=VERSION: the file apt-get download wrote (any arch), or nothing
    local pkg=${1%%=*} ver=${1#*=} f
    for f in "$OUT/debs/${pkg}_${ver//:/%3a}"_*.deb; do
        [[ -s "$f" ]] && echo "$f" && return 0
    done
    return 0
}
pinned_deb() { # pinned_deb PKG: the downloaded file of the pinned version of PKG
    deb_path "$(printf '%s\n' "${PINNED[@]}" | grep "^$1=")"
}
missing=()
for p in "${PINNED[@]}"; do
    [[ -n "$(deb_path "$p")" ]] || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "downloading ${#missing[@]} packages: ${missing[*]}"
    (cd "$OUT/debs" && apt-get -o Acquire::Retries=3 download "${missing[@]}" >&2) ||
        die "apt-get download ${missing[*]} failed"
fi
keep=()
for p in "${PINNED[@]}"; do
    f=$(deb_path "$p")
    [[ -n "$f" ]] || die "apt-get download left no file for $p in $OUT/debs"
    keep+=("$(basename "$f")")
done
# Keep only the current set.
for f in "$OUT/debs"/*.deb; do
    printf '%s\n' "${keep[@]}" | grep -qxF "$(basename "$f")" || rm -f "$f"
done

# --- kernel and modules -------------------------------------------------------
kroot="$work/kernel"
mkdir -p "$kroot"
kdeb=$(pinned_deb "$KPKG")
log "unpacking $(basename "$kdeb")"
dpkg-deb -x "$kdeb" "$kroot"
vmlinuz="$kroot/boot/vmlinuz-$KREL"
[[ -f "$vmlinuz" ]] || die "$kdeb has no boot/vmlinuz-$KREL"
if [[ -d "$kroot/usr/lib/modules/$KREL" ]]; then
    kmods="$kroot/usr/lib/modules/$KREL"
elif [[ -d "$kroot/lib/modules/$KREL" ]]; then
    kmods="$kroot/lib/modules/$KREL"
else
    die "$kdeb has no modules for $KREL"
fi
kbase=${kmods%/lib/modules/$KREL}
depmod -b "$kbase" "$KREL"

# --- userland: busybox, iproute2, libc ----------------------------------------
stage="$work/stage"
mkdir -p "$stage"
for p in "${PINNED[@]}"; do
    [[ "${p%%=*}" == "$KPKG" ]] && continue
    dpkg-deb -x "$(deb_path "$p")" "$stage"
done
loader="$stage/usr/lib/$MULTIARCH/ld-linux-x86-64.so.2"
[[ -f "$loader" && ! -L "$loader" ]] || die "libc6 has no loader at usr/lib/$MULTIARCH/ld-linux-x86-64.so.2"

rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,dev,proc,sys,tmp,run,etc/lab,root,lab,lib64,usr/bin,usr/sbin,"usr/lib/$MULTIARCH"}
# Merged /usr, as on trixie: libraries' relative symlinks resolve through it.
ln -s usr/lib "$rootfs/lib"
mkdir -p "$rootfs/var"
ln -s ../run "$rootfs/var/run"
# The loader must be a real file at the path every binary names.
cp "$loader" "$rootfs/lib64/ld-linux-x86-64.so.2"

# busybox and its applets (not `sh`: dash is /bin/sh; not `ip`: iproute2's)
bb="$stage/usr/bin/busybox"
[[ -x "$bb" ]] || die "busybox-static has no usr/bin/busybox"
cp "$bb" "$rootfs/bin/busybox"
for applet in $("$bb" --list); do
    case "$applet" in busybox | ip | sh) continue ;; esac
    [[ -e "$rootfs/bin/$applet" ]] || ln -s busybox "$rootfs/bin/$applet"
done

# Every shared library of libc6 and libgcc-s1 (payload binaries link them),
# and what the extra binaries need, as the trixie loader resolves it.
libdir="$stage/usr/lib/$MULTIARCH"
copy_lib() { # copy_lib FILE: into the image's library directory, by its name
    local f=$1 name
    name=$(basename "$f")
    [[ -e "$rootfs/usr/lib/$MULTIARCH/$name" ]] || cp -L "$f" "$rootfs/usr/lib/$MULTIARCH/$name"
}
while read -r f; do
    copy_lib "$f"
done < <({ dpkg-deb -c "$(pinned_deb libc6)" && dpkg-deb -c "$(pinned_deb libgcc-s1)"; } |
    awk '{print $6}' | sed -n "s|^\./usr/lib/$MULTIARCH/\([^/]*\.so[^/]*\)$|$libdir/\1|p")
for bin in "${EXTRA_BINS[@]}"; do
    [[ -x "$stage/$bin" ]] || die "the trixie packages have no $bin"
    cp "$stage/$bin" "$rootfs/$bin"
    libs=$("$loader" --library-path "$libdir" --list "$stage/$bin") || die "cannot resolve the libraries of $bin"
    while read -r f; do
        [[ -n "$f" ]] && copy_lib "$f"
    done < <(sed -n 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' <<<"$libs")
    if grep -q 'not found' <<<"$libs"; then
        die "libraries of $bin missing from the trixie packages: $(grep 'not found' <<<"$libs" | tr -s ' \t' ' ')"
    fi
done
ln -s ../usr/bin/dash "$rootfs/bin/sh"
(cd "$rootfs/usr/lib/$MULTIARCH" && ls) | sort >"$rootfs/etc/lab/base-libs"

# Modules: decompressed (busybox insmod takes plain .ko), at their paths
# under /lib/modules/KREL with a modules.dep of their own, so both the boot
# list and `modprobe NAME` work in the guest.
gmods="$rootfs/usr/lib/modules/$KREL"
mkdir -p "$gmods"
: >"$rootfs/etc/lab/modules.load"
declare -A seen=()
for m in "${MODULES[@]}"; do
    deps=$(modprobe -d "$kbase" -S "$KREL" --show-depends "$m") || die "module $m not found in $KPKG"
    while read -r kind path _; do
        case "$kind" in
        builtin) log "module $path is built in" ;;
        insmod)
            rel=${path#"$kmods"/}
            plain=${rel%.xz}
            plain=${plain%.zst}
            plain=${plain%.gz}
            [[ -n "${seen[$plain]:-}" ]] && continue
            seen[$plain]=1
            mkdir -p "$gmods/$(dirname "$plain")"
            case "$rel" in
            *.ko.xz) xz -dc "$path" >"$gmods/$plain" ;;
            *.ko.zst) zstd -qdc "$path" >"$gmods/$plain" ;;
            *.ko.gz) gzip -dc "$path" >"$gmods/$plain" ;;
            *.ko) cp "$path" "$gmods/$plain" ;;
            *) die "unexpected module file $path" ;;
            esac
            echo "$plain" >>"$rootfs/etc/lab/modules.load"
            ;;
        esac
    done <<<"$deps"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f "$kmods/$f" ]] && cp "$kmods/$f" "$gmods/$f"
done
depmod -b "$rootfs/usr" "$KREL"
[[ -s "$gmods/modules.dep" ]] || die "depmod wrote no modules.dep for the image"

install -m 0755 "$INIT_SRC" "$rootfs/init"
install -m 0644 "$LIB_SRC" "$rootfs/etc/lab/lib.sh"
echo "$KREL" >"$rootfs/etc/lab/kernel-release"
# The kernel opens /dev/console before /init runs.
mknod -m 600 "$rootfs/dev/console" c 5 1
mknod -m 666 "$rootfs/dev/null" c 1 3

# zstd keeps the image small and fast to unpack under TCG. The padding puts
# an appended uncompressed archive at a 4-byte boundary, where the kernel
# looks for the next cpio header (zero bytes between archives are skipped).
(cd "$rootfs" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --quiet) | zstd -q -T0 -9 -o "$work/initramfs.img"
size=$(stat -c %s "$work/initramfs.img")
pad=$(((512 - size % 512) % 512))
head -c "$pad" /dev/zero >>"$work/initramfs.img"

mv "$work/initramfs.img" "$OUT/initramfs.img"
cp "$vmlinuz" "$OUT/vmlinuz"
cp "$rootfs/etc/lab/base-libs" "$OUT/base-libs"
echo "$KPKG" >"$OUT/kernel-version"
rm -rf "$work"
echo "$key" >"$OUT/stamp"
log "done in $(($(date +%s) - start)) s: $(du -h "$OUT/initramfs.img" | cut -f1) initramfs, kernel $KREL"
