#!/usr/bin/env bash
# Installs what tern's demo, tests and benchmarks need on a fresh Debian 12 machine (root).
# Idempotent: a second run only checks.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs Debian packages)" >&2; exit 1; }; }

backports=/etc/apt/sources.list.d/tern-bookworm-backports.sources
pkgs=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static iproute2 iputils-ping cpio zstd
  xz-utils kmod bridge-utils mount
  # The OS image (guest/build-os.sh) and its guests: firmware, boot loader, FAT tools, SSH.
  mmdebstrap ovmf syslinux syslinux-common syslinux-efi mtools dosfstools fdisk e2fsprogs
  openssh-client
  # The lab's SAN: an iSCSI target, and QEMU's own initiator (block-iscsi, from backports).
  tgt qemu-block-extra
  # The PostgreSQL test's client.
  postgresql-client
  # The web client's tests: a real, headless browser and its WebDriver.
  chromium chromium-driver
  # HA mode: etcd for the lab's three-member store, and protoc (with its well-known types)
  # for the etcd client's generated gRPC code.
  etcd-server etcd-client protobuf-compiler libprotobuf-dev
  # The agent-under-systemd test: a booted systemd in a container of this machine's /usr.
  systemd-container)

# The web client test's accessibility check: axe-core from npm, pinned, cached per version.
axe_version=4.14.1
axe_dir=${XDG_CACHE_HOME:-$HOME/.cache}/tern/npm/axe-core-$axe_version
install_axe() {
  [ -f "$axe_dir/node_modules/axe-core/axe.min.js" ] && return 0
  command -v npm >/dev/null || apt-get install -y -q --no-install-recommends npm
  mkdir -p "$axe_dir"
  npm install --prefix "$axe_dir" --no-audit --no-fund --loglevel=error "axe-core@$axe_version"
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ] && command -v qemu-system-x86_64 >/dev/null; then
  install_axe
  exit 0
fi
need_root
export DEBIAN_FRONTEND=noninteractive
# QEMU must come from bookworm-backports: the machine's qemu-utils 10 conflicts with bookworm's 7.2.
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -q
apt-get install -y -q -t bookworm-backports --no-install-recommends qemu-system-x86 qemu-utils \
  qemu-block-extra
apt-get install -y -q --no-install-recommends "${pkgs[@]}"
install_axe
