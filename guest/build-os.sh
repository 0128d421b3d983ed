#!/usr/bin/env bash
# Builds tern's full-OS test image from Debian packages only: Debian 12 with systemd,
# openssh-server, cloud-init (NoCloud) and PostgreSQL, booted by firmware (SeaBIOS or UEFI)
# from its own disk, as users' cloud images are.
#   OUTDIR/debian-12.qcow2  the template (qcow2, uncompressed: TCG guests read it fast)
#   OUTDIR/MANIFEST         the input fingerprint, every installed package and version, the
#                           image's sha256, and the disk layout
# Usage: guest/build-os.sh [OUTDIR]   (default: target/os under the repository)
#
# Layout (MBR, so one disk boots on both firmwares):
#   1  64 MiB FAT, active, type EF: SYSLINUX for BIOS (its boot sector + ldlinux.sys) and for
#      UEFI (EFI/BOOT/BOOTX64.EFI), one syslinux.cfg, the kernel and initrd
#   2  ext4 root, label tern-root; cloud-init grows it to the disk's size on first boot
# SYSLINUX rather than GRUB: it installs into a FAT image with mtools, so the image is made
# without loop devices, mounts or a device map (GRUB's installer needs all three), and a
# non-root builder or an unprivileged CI could make it the same way.
#
# Cached: the finished image is kept in TERN_OS_CACHE (default ~/.cache/tern/os) under its
# input fingerprint (this script and the candidate versions of the packages it installs), so a
# fresh clone copies it instead of building (~1 min with mmdebstrap).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/target/os}
CACHE=${TERN_OS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tern/os}
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
SUITE=bookworm
NAME=debian-12
PACKAGES=(linux-image-cloud-amd64 systemd-sysv udev dbus openssh-server cloud-init
  cloud-guest-utils fdisk sudo postgresql iproute2 procps netbase)
ESP_MIB=64
ROOT_SLACK_MIB=384 # free space in the template's root fs; a clone grows it to its disk size
# Fixed identities, so two builds of the same inputs make the same file systems.
DISK_ID=0x7465726e
ESP_ID=7465726e
ROOT_UUID=5a1d2c3e-7465-726e-8000-000000000001
KERNEL_CMDLINE="root=LABEL=tern-root ro console=ttyS0,115200n8 net.ifnames=1"

die() {
  echo "guest/build-os.sh: error: $*" >&2
  exit 1
}
say() { echo "guest/build-os.sh: $*" >&2; }

started=$(date +%s)
PATH=$PATH:/usr/sbin:/sbin
for tool in mmdebstrap apt-cache mkfs.ext4 mkfs.vfat mcopy mmd syslinux sfdisk qemu-img sha256sum flock; do
  command -v "$tool" >/dev/null || die "'$tool' not found: run scripts/setup.sh (as root) first"
done
for f in /usr/lib/syslinux/mbr/mbr.bin /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi \
  /usr/lib/syslinux/modules/efi64/ldlinux.e64; do
  [ -f "$f" ] || die "$f missing: run scripts/setup.sh (syslinux, syslinux-efi)"
done
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap's root mode installs packages into a chroot)"

mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
exec 9>"$CACHE/.lock"
flock 9

# --- Input fingerprint: this script and what apt would install now. ---------------------------
sha() { sha256sum "$1" | cut -c1-64; }
VERSIONS=$(apt-cache policy "${PACKAGES[@]}" 2>/dev/null | awk '/^[^ ]/ { p = $1 } $1 == "Candidate:" { print p, $2 }')
[ "$(wc -l <<<"$VERSIONS")" = "${#PACKAGES[@]}" ] && ! grep -q "(none)" <<<"$VERSIONS" ||
  die "apt does not know all of ${PACKAGES[*]}: run scripts/setup.sh (it runs apt-get update)"
FINGERPRINT=$(printf '%s\n' "build-os.sh $(sha "${BASH_SOURCE[0]}")" "$VERSIONS" "epoch $EPOCH" |
  sha256sum | cut -c1-64)
CACHED=$CACHE/$FINGERPRINT

install_from_cache() {
  [ -f "$CACHED/MANIFEST" ] && [ -f "$CACHED/$NAME.qcow2" ] || return 1
  grep -qx "output $(sha "$CACHED/$NAME.qcow2") $NAME.qcow2" "$CACHED/MANIFEST" || return 1
  if [ -f "$OUT/MANIFEST" ] && cmp -s "$CACHED/MANIFEST" "$OUT/MANIFEST" && [ -f "$OUT/$NAME.qcow2" ]; then
    say "OS image in $OUT is up to date (input $FINGERPRINT)"
    return 0
  fi
  rm -f "$OUT/MANIFEST"
  cp --reflink=auto "$CACHED/$NAME.qcow2" "$OUT/.$NAME.qcow2.tmp"
  mv "$OUT/.$NAME.qcow2.tmp" "$OUT/$NAME.qcow2"
  cp "$CACHED/MANIFEST" "$OUT/MANIFEST"
  say "OS image copied from the cache into $OUT (input $FINGERPRINT)"
}
install_from_cache && exit 0

# --- Build. -----------------------------------------------------------------------------------
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "building the OS image (input $FINGERPRINT)"

# Configuration written into the tree before it is packed.
cat >"$WORK/configure" <<'HOOK'
#!/bin/sh
set -eu
r=$1
echo "LABEL=tern-root / ext4 defaults,errors=remount-ro 0 1" >"$r/etc/fstab"
# cloud-init: NoCloud only (no probing of cloud metadata services), networkd renders the
# network (no ifupdown, no DHCP client package), one fast host key type under TCG.
cat >"$r/etc/cloud/cloud.cfg.d/90-tern.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
system_info:
  network:
    renderers: [ networkd ]
ssh_genkeytypes: [ ed25519 ]
ssh_deletekeys: true
# The image carries no locale data (locales would cost a generation at every first boot).
locale: C.UTF-8
CFG
chroot "$r" systemctl enable systemd-networkd.service >/dev/null 2>&1
# Timers and jobs that would compete with the workload (and a test's timing) under TCG.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
  fstrim.timer systemd-networkd-wait-online.service; do
  chroot "$r" systemctl mask "$u" >/dev/null 2>&1
done
# Per-instance identity is made at first boot: machine id, SSH host keys, hostname.
: >"$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id" "$r"/etc/ssh/ssh_host_* "$r/etc/hostname"
rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/log/*.log
HOOK
chmod +x "$WORK/configure"

SOURCE_DATE_EPOCH=$EPOCH nice mmdebstrap --variant=minbase --mode=root --format=directory \
  --include="$(
    IFS=,
    echo "${PACKAGES[*]}"
  )" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook="$WORK/configure \"\$1\"" \
  "$SUITE" "$WORK/root" >"$WORK/mmdebstrap.log" 2>&1 ||
  die "mmdebstrap failed; its log: $(tail -n 20 "$WORK/mmdebstrap.log")"

mapfile -t kernels < <(cd "$WORK/root/boot" && ls vmlinuz-*)
[ "${#kernels[@]}" = 1 ] || die "expected one kernel in the image, found: ${kernels[*]}"
KREL=${kernels[0]#vmlinuz-}
[ -f "$WORK/root/boot/initrd.img-$KREL" ] || die "no initrd for $KREL in the image"
PKG_LIST=$(chroot "$WORK/root" dpkg-query -W -f '${Package} ${Version}\n' | sort)

# ESP: SYSLINUX for both firmwares, the kernel and initrd. Hidden sectors = the partition's
# start, so SYSLINUX's boot sector finds itself once the image is placed on the disk.
ESP=$WORK/esp.img
cat >"$WORK/syslinux.cfg" <<CFG
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $KERNEL_CMDLINE
CFG
truncate -s "${ESP_MIB}M" "$ESP"
mkfs.vfat -F 32 -n TERN-ESP -i "$ESP_ID" -h 2048 --invariant "$ESP" >/dev/null
export MTOOLS_SKIP_CHECK=1
cp "$WORK/root/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
cp "$WORK/root/boot/initrd.img-$KREL" "$WORK/initrd.img"
touch -d "@$EPOCH" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg"
mcopy -m -i "$ESP" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/
mmd -i "$ESP" ::/EFI ::/EFI/BOOT
cp /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi "$WORK/BOOTX64.EFI"
cp /usr/lib/syslinux/modules/efi64/ldlinux.e64 "$WORK/ldlinux.e64"
touch -d "@$EPOCH" "$WORK/BOOTX64.EFI" "$WORK/ldlinux.e64"
mcopy -m -i "$ESP" "$WORK/BOOTX64.EFI" "$WORK/ldlinux.e64" "$WORK/syslinux.cfg" ::/EFI/BOOT/
syslinux --install "$ESP"

# Root file system, packed from the tree (no mount).
used_mib=$(du -sm --apparent-size "$WORK/root" | cut -f1)
ROOT_MIB=$((used_mib * 110 / 100 + ROOT_SLACK_MIB))
ROOTFS=$WORK/root.img
E2FSPROGS_FAKE_TIME=$EPOCH mkfs.ext4 -q -L tern-root -U "$ROOT_UUID" \
  -E "hash_seed=$ROOT_UUID,root_owner=0:0" -d "$WORK/root" "$ROOTFS" "${ROOT_MIB}M" ||
  die "mkfs.ext4 could not pack the root tree"

# The disk: MBR with SYSLINUX's boot code, the ESP (active), the root.
DISK=$WORK/disk.raw
truncate -s "$((1 + ESP_MIB + ROOT_MIB))M" "$DISK"
sfdisk -q "$DISK" <<LAYOUT
label: dos
label-id: $DISK_ID
start=2048, size=$((ESP_MIB * 2048)), type=ef, bootable
start=$(((1 + ESP_MIB) * 2048)), type=83
LAYOUT
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if="$ESP" of="$DISK" bs=1M seek=1 conv=notrunc status=none
dd if="$ROOTFS" of="$DISK" bs=1M seek="$((1 + ESP_MIB))" conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$DISK" "$WORK/$NAME.qcow2"

{
  echo "input $FINGERPRINT"
  echo "output $(sha "$WORK/$NAME.qcow2") $NAME.qcow2"
  echo "kernel $KREL"
  echo "cmdline $KERNEL_CMDLINE"
  echo "disk $((1 + ESP_MIB + ROOT_MIB)) MiB: esp ${ESP_MIB} MiB fat32 (syslinux bios+efi), root ${ROOT_MIB} MiB ext4 (${used_mib} MiB used)"
  echo "epoch $EPOCH"
  sed 's/^/package /' <<<"$PKG_LIST"
} >"$WORK/MANIFEST"

rm -rf "$CACHED"
mkdir -p "$CACHED"
mv "$WORK/$NAME.qcow2" "$WORK/MANIFEST" "$CACHED/"
install_from_cache || die "the built image did not check against its MANIFEST"
say "built in $(($(date +%s) - started)) s: $(du -h --apparent-size "$OUT/$NAME.qcow2" | cut -f1) ($(grep -c '^package ' "$OUT/MANIFEST") packages)"
