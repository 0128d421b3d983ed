#!/usr/bin/env bash
# tern's demo: a 2-host lab cluster on this machine, a VM serving a TCP stream to a client in
# the lab's client namespace, a live migration of that VM while the client streams, and the
# client's view of it. Installs what it needs, builds,
# and tears the lab down at the end (also on Ctrl-C or failure). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (the lab needs network namespaces)" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "installing packages (QEMU from bookworm-backports, guest kernel, busybox)"
bash scripts/setup.sh
step "building tern"
cargo build -p tern -q
step "building the guest image (Debian kernel + busybox + tern-guest)"
bash guest/build.sh target/guest

tern=target/debug/tern
labdir=/var/tmp/tern-demo
export TERN_LAB_DIR=$labdir
cleanup() { step "tearing the lab down"; $tern lab down --prefix tdemo --dir "$labdir" || true; }
trap cleanup EXIT

step "bringing up a lab: center + 2 hosts in network namespaces, a switch, a client"
$tern lab up --hosts 2 --prefix tdemo --dir "$labdir" --guest-dir target/guest
# The CLI finds the lab's center socket and token through lab.json in the lab dir.
export TERN_CENTER="unix:$labdir/center/center.sock"
export TERN_TOKEN="$(cat "$labdir/admin.token")"
$tern host list

g=$labdir/shared/guest
step "creating and starting VM 'web' on h1 (1 vCPU, 256 MiB, IP 10.78.0.100)"
$tern vm create web --cluster lab --host h1 --vcpus 1 --memory-mib 256 \
  --kernel "$g/vmlinuz" --initrd "$g/initramfs.img" \
  --cmdline "console=ttyS0 quiet ipv6.disable=1 tern.ip=10.78.0.100/24 tern.serve=7000 tern.mem=64 tern.dirty=16" \
  --mac 52:54:00:00:00:64
$tern vm start web
printf 'waiting for the guest to boot'
for _ in $(seq 1 120); do
  if $tern vm console web --bytes 4096 2>/dev/null | grep -q TERN-GUEST-READY; then break; fi
  printf '.'; sleep 0.5
done
echo
$tern vm console web --bytes 4096 | grep TERN-GUEST-READY
$tern vm list

step "a client in the lab's client namespace streams from the VM for 3 s"
$tern lab client --prefix tdemo --dir "$labdir" -- target/guest/tern-guest client --addr 10.78.0.100:7000 --duration-ms 3000
step "live migration h1 -> h2 while the client streams from the VM"
clientlog=$(mktemp)
$tern lab client --prefix tdemo --dir "$labdir" -- target/guest/tern-guest client \
  --addr 10.78.0.100:7000 --duration-ms 9000 --json > "$clientlog" &
client_pid=$!
sleep 2
$tern vm migrate web --to h2 -o json > "$labdir/migration.json"
wait "$client_pid" || true
$tern vm list
python3 - "$labdir/migration.json" "$clientlog" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m = m.get("result", m)
c = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"migration {m['from']} -> {m['to']}: {m['status']}")
print(f"  total time          {m['total_ms']} ms")
print(f"  QEMU downtime       {m['downtime_ms']} ms")
print(f"  client's TCP gap    {c['longest_gap_ms']} ms   (resets {c['resets']}, missing {c['missing']}, duplicates {c['duplicates']})")
PY
rm -f "$clientlog"

step "what the guest itself reports (memory verifier, longest pause it saw)"
$tern lab client --prefix tdemo --dir "$labdir" -- target/guest/tern-guest client --addr 10.78.0.100:7000 --stats
$tern event list --limit 10
