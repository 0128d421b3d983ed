#!/usr/bin/env bash
# Builds tern's Debian packages into target/debian (or --out DIR):
#   tern         /usr/bin/tern (the CLI and both daemons), the README
#   tern-center  the tern-center service (strict sandbox, user tern), /etc/tern/center.toml
#   tern-host    the tern-host service (KillMode=process: VMs outlive the agent),
#                /etc/tern/host.toml; depends on QEMU
# Units ship disabled; `tern center init` and `tern host join` write the config and enable
# them. Config files are conffiles: an upgrade keeps the operator's.
#
#   scripts/package.sh [--binary PATH] [--out DIR] [--fast]
# Without --binary, builds the release binary first (cargo build --release -p tern).
# --fast compresses with gzip -1 instead of xz (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
binary=""
compress=(-Zxz)
out=${CARGO_TARGET_DIR:-target}/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release -p tern --locked -q
  binary=${CARGO_TARGET_DIR:-target}/release/tern
fi
[ -x "$binary" ] || { echo "package.sh: $binary is not an executable" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$out"

control() { # name arch depends description...
  local name=$1 a=$2 depends=$3; shift 3
  mkdir -p "$stage/$name/DEBIAN"
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $a"
    echo "Maintainer: tern developers <tern@localhost>"
    echo "Section: admin"
    echo "Priority: optional"
    [ -n "$depends" ] && echo "Depends: $depends"
    echo "Description: $1"
    shift
    for line in "$@"; do echo " $line"; done
  } > "$stage/$name/DEBIAN/control"
}

service() { # package unit
  local name=$1 unit=$2
  install -D -m 0644 "packaging/systemd/$unit" "$stage/$name/lib/systemd/system/$unit"
  for script in prerm postrm; do
    sed "s/@UNIT@/$unit/" "packaging/debian/service.$script" > "$stage/$name/DEBIAN/$script"
    chmod 0755 "$stage/$name/DEBIAN/$script"
  done
  install -m 0755 "packaging/debian/$name.postinst" "$stage/$name/DEBIAN/postinst"
}

control tern "$arch" "libc6" \
  "live migration and cluster scheduling for QEMU/KVM" \
  "tern moves running VMs between hosts with no downtime a user notices, balances" \
  "clusters by migrating them (DRS), empties hosts for maintenance live, and keeps a" \
  "CPU baseline per cluster (EVC). This package holds the one binary: the CLI, the" \
  "center and the host agent. Install tern-center or tern-host for their services."
install -D -m 0755 "$binary" "$stage/tern/usr/bin/tern"
install -D -m 0644 README.md "$stage/tern/usr/share/doc/tern/README.md"

control tern-center all "tern (= $version), adduser" \
  "tern center service (cluster manager)" \
  "The tern-center systemd service, run as the system user tern under a strict" \
  "sandbox, and its config file. Set it up with: tern center init --listen IP:PORT"
service tern-center tern-center.service
install -D -m 0644 packaging/etc/center.toml "$stage/tern-center/etc/tern/center.toml"
echo /etc/tern/center.toml > "$stage/tern-center/DEBIAN/conffiles"

control tern-host all "tern (= $version), qemu-system-x86, iproute2" \
  "tern host agent service (runs the host's VMs)" \
  "The tern-host systemd service and its config file. Stopping, restarting or" \
  "upgrading it leaves the VMs running. Set it up with the join token of" \
  "'tern host add NAME' on the center: tern host join https://CENTER:PORT --token T"
sed -i 's/^Depends: .*/&\nRecommends: ovmf/' "$stage/tern-host/DEBIAN/control"
service tern-host tern-host.service
install -D -m 0644 packaging/etc/host.toml "$stage/tern-host/etc/tern/host.toml"
echo /etc/tern/host.toml > "$stage/tern-host/DEBIAN/conffiles"

for name in tern tern-center tern-host; do
  a=$arch; [ "$name" = tern ] || a=all
  dpkg-deb --root-owner-group "${compress[@]}" --build "$stage/$name" "$out/${name}_${version}_${a}.deb" >/dev/null
  echo "$out/${name}_${version}_${a}.deb"
done
