#!/usr/bin/env bash
# Builds tern's test guest from Debian packages only:
#   OUTDIR/vmlinuz        the kernel of linux-image-cloud-amd64 (the version apt would install)
#   OUTDIR/initramfs.img  busybox-static, the virtio (+ power button) modules, tern-guest as /init
#   OUTDIR/tern-guest     the same static binary, for the client side
#   OUTDIR/MANIFEST       package versions, .deb and output sha256s, the input fingerprint
# Usage: guest/build.sh [OUTDIR]   (default: target/guest under the repository)
# Reproducible (fixed mtimes from SOURCE_DATE_EPOCH, sorted cpio, uid 0) and cached: .debs are
# kept in TERN_GUEST_CACHE (default ~/.cache/tern/guest), and a run whose inputs did not change
# leaves OUTDIR alone and says it is up to date.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/guest}
CACHE=${TERN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/guest}
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
# Modules the guest needs; their dependencies are found in modules.dep.
MODULE_ROOTS=(virtio_pci virtio_net virtio_blk button evdev)
COMPRESS=(zstd -q -19 -T1)

die() {
  echo "guest/build.sh: error: $*" >&2
  exit 1
}
say() { echo "guest/build.sh: $*" >&2; }

started=$(date +%s.%N)
PATH=$PATH:/usr/sbin:/sbin # depmod, for users whose PATH lacks sbin
for tool in apt-get apt-cache dpkg-deb depmod cpio zstd sha256sum cargo find sort flock; do
  command -v "$tool" >/dev/null || die "'$tool' not found: run scripts/setup.sh (as root) first"
done

mkdir -p "$OUT" "$CACHE/debs"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.build.lock"
flock 9

# --- Which packages: the candidates apt would install now (one apt-cache call: it is slow). ---
SHOW=$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null) || true
field() { # field PACKAGE FIELD: from $SHOW
  awk -v p="$1" -v f="$2:" '$1 == "Package:" { cur = $2 } cur == p && $1 == f { sub(/^[^:]*: /, ""); print; exit }' <<<"$SHOW"
}
KERNEL_DEP=$(field "$KERNEL_META" Depends | tr ',' '\n' | grep -m1 -E '^ *linux-image-' || true)
KERNEL_PKG=$(awk '{ print $1 }' <<<"$KERNEL_DEP")
KERNEL_VER=$(sed -n 's/.*(= *\([^)]*\)).*/\1/p' <<<"$KERNEL_DEP")
BUSYBOX_VER=$(field "$BUSYBOX_PKG" Version)
[ -n "$KERNEL_PKG" ] && [ -n "$BUSYBOX_VER" ] ||
  die "apt does not know $KERNEL_META or $BUSYBOX_PKG: run scripts/setup.sh (it runs apt-get update)"
if [ -z "$KERNEL_VER" ]; then # not pinned by the meta package: take the kernel's candidate
  KERNEL_VER=$(apt-cache policy "$KERNEL_PKG" | awk '$1 == "Candidate:" { print $2 }')
  [ -n "$KERNEL_VER" ] && [ "$KERNEL_VER" != "(none)" ] || die "no installable version of $KERNEL_PKG"
fi

# Downloads (once) a package version into the cache; prints its path.
fetch_deb() {
  local pkg=$1 ver=$2 file tmp
  file="$CACHE/debs/${pkg}_${ver//:/%3a}_amd64.deb"
  if [ ! -s "$file" ]; then
    say "downloading $pkg $ver"
    tmp=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
    local sandbox=()
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$pkg=$ver" >&2); then
      rm -rf "$tmp"
      die "apt-get download $pkg=$ver failed: check the network and run scripts/setup.sh"
    fi
    mv "$tmp"/*.deb "$file"
    rm -rf "$tmp"
  fi
  [ "$(dpkg-deb -f "$file" Package Version | tr '\n' ' ')" = "Package: $pkg Version: $ver " ] ||
    die "$file is not $pkg $ver: delete it and retry"
  echo "$file"
}
exec 8>"$CACHE/.lock"
flock 8
KERNEL_DEB=$(fetch_deb "$KERNEL_PKG" "$KERNEL_VER")
BUSYBOX_DEB=$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VER")
flock -u 8

# --- tern-guest, static. -----------------------------------------------------------------------
# A separate target triple and the release profile keep the host's target/debug untouched.
(cd "$ROOT" &&
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --target "$TARGET" -p tern-guest) ||
  die "cargo build of tern-guest failed"
GUEST_BIN="$TARGET_DIR/$TARGET/release/tern-guest"
[ -x "$GUEST_BIN" ] || die "$GUEST_BIN was not built"
if command -v readelf >/dev/null && readelf -l "$GUEST_BIN" | grep -q 'program interpreter'; then
  die "$GUEST_BIN is dynamically linked; it must be static (crt-static)"
fi

# --- Up to date? ------------------------------------------------------------------------------
sha() { sha256sum "$1" | cut -c1-64; }
KERNEL_DEB_SHA=$(sha "$KERNEL_DEB")
BUSYBOX_DEB_SHA=$(sha "$BUSYBOX_DEB")
GUEST_SHA=$(sha "$GUEST_BIN")
FINGERPRINT=$(printf '%s\n' "$KERNEL_PKG $KERNEL_VER $KERNEL_DEB_SHA" \
  "$BUSYBOX_PKG $BUSYBOX_VER $BUSYBOX_DEB_SHA" "tern-guest $GUEST_SHA" \
  "build.sh $(sha "${BASH_SOURCE[0]}")" "modules ${MODULE_ROOTS[*]}" "epoch $EPOCH" \
  "compress ${COMPRESS[*]}" | sha256sum | cut -c1-64)

outputs_match() {
  local manifest=$OUT/MANIFEST name
  [ -f "$manifest" ] && grep -qx "input $FINGERPRINT" "$manifest" || return 1
  for name in vmlinuz initramfs.img tern-guest; do
    [ -f "$OUT/$name" ] || return 1
    grep -qx "output $(sha "$OUT/$name") $(stat -c %s "$OUT/$name") $name" "$manifest" || return 1
  done
}
if outputs_match; then
  say "guest image in $OUT is up to date (input $FINGERPRINT)"
  exit 0
fi

# --- Build in a scratch dir next to OUTDIR, then move into place. -----------------------------
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "building the guest image in $OUT"
rm -f "$OUT/MANIFEST" # until the new one is written, OUTDIR is not a finished image

mkdir -p "$WORK/kernel" "$WORK/busybox" "$WORK/root"
dpkg-deb -x "$KERNEL_DEB" "$WORK/kernel"
dpkg-deb -x "$BUSYBOX_DEB" "$WORK/busybox"
mapfile -t krels < <(ls "$WORK/kernel/lib/modules")
[ "${#krels[@]}" = 1 ] || die "expected one kernel release in $KERNEL_DEB, found: ${krels[*]}"
KREL=${krels[0]}
KMOD="$WORK/kernel/lib/modules/$KREL"
[ -f "$WORK/kernel/boot/vmlinuz-$KREL" ] || die "$KERNEL_DEB has no boot/vmlinuz-$KREL"
# The package ships no modules.dep (its postinst makes it): make it for the extracted tree.
depmod -b "$WORK/kernel" "$KREL" || die "depmod failed on $KERNEL_PKG's modules"
[ -f "$KMOD/modules.dep" ] || die "depmod wrote no modules.dep for $KREL"

# Module closure in load order: each module after everything it depends on.
declare -A DEPS=() BY_NAME=() SEEN=()
while IFS=: read -r mod deps; do
  DEPS[$mod]=$deps
  name=${mod##*/}
  BY_NAME[${name%.ko}]=$mod
done <"$KMOD/modules.dep"
ORDERED=()
visit() {
  local m=$1 d
  [ -n "${SEEN[$m]:-}" ] && return
  SEEN[$m]=1
  for d in ${DEPS[$m]}; do visit "$d"; done
  ORDERED+=("$m")
}
for name in "${MODULE_ROOTS[@]}"; do
  [ -n "${BY_NAME[$name]:-}" ] || die "module $name is not in $KERNEL_PKG's modules.dep"
  visit "${BY_NAME[$name]}"
done

R="$WORK/root"
mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/tmp" "$R/etc/tern" "$R/lib/modules/$KREL"
install -m 0755 "$WORK/busybox/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
install -m 0755 "$GUEST_BIN" "$R/bin/tern-guest"
ln -s bin/tern-guest "$R/init"
ln -s bin "$R/sbin"
: >"$R/etc/tern/modules"
MODULE_NAMES=()
for m in "${ORDERED[@]}"; do
  install -D -m 0644 "$KMOD/$m" "$R/lib/modules/$KREL/$m"
  echo "/lib/modules/$KREL/$m" >>"$R/etc/tern/modules"
  name=${m##*/}
  MODULE_NAMES+=("${name%.ko}")
done
printf '%s\n' "$FINGERPRINT" >"$R/etc/tern/image-input"

find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  cpio --quiet -o -H newc --null --reproducible -R 0:0) | "${COMPRESS[@]}" >"$WORK/initramfs.img"
install -m 0644 "$WORK/kernel/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
install -m 0755 "$GUEST_BIN" "$WORK/tern-guest"
touch -d "@$EPOCH" "$WORK/vmlinuz" "$WORK/initramfs.img" "$WORK/tern-guest"

{
  echo "# tern guest image, written by guest/build.sh: do not edit"
  echo "input $FINGERPRINT"
  echo "source_date_epoch $EPOCH"
  echo "kernel_release $KREL"
  echo "package $KERNEL_PKG $KERNEL_VER $KERNEL_DEB_SHA"
  echo "package $BUSYBOX_PKG $BUSYBOX_VER $BUSYBOX_DEB_SHA"
  echo "modules ${MODULE_NAMES[*]}"
  echo "compression ${COMPRESS[*]}"
  for name in vmlinuz initramfs.img tern-guest; do
    echo "output $(sha "$WORK/$name") $(stat -c %s "$WORK/$name") $name"
  done
} >"$WORK/MANIFEST"
for name in vmlinuz initramfs.img tern-guest MANIFEST; do
  mv -f "$WORK/$name" "$OUT/$name"
done
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
say "built $OUT in ${elapsed}s: initramfs.img $(stat -c %s "$OUT/initramfs.img") bytes, modules: ${MODULE_NAMES[*]}"
