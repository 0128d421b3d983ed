#!/usr/bin/env python3
"""bench/boot: how long `tern vm start` takes to a booted guest, and what the VM costs in memory,
against a plain `qemu-system-x86_64` command booting the same kernel and initramfs.

Both are timed the same way: from the moment the command is issued to the moment the guest's
`TERN-GUEST-READY` line appears in its serial console file (polled every 10 ms). Both run in
the same lab host namespace, with a tap on the same bridge, under the same accelerator.
Prints a markdown table. Run as root from the repository (bench/boot/run.sh builds first).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TERN = os.path.join(ROOT, "target", "debug", "tern")
PREFIX = "tbb"
LABDIR = "/var/tmp/tern-bench-boot"


def sh(*args, check=True, env=None, capture=True):
    r = subprocess.run(args, capture_output=capture, text=True, env=env)
    if check and r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def wait_ready(path, t0, timeout_s=120.0):
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if b"TERN-GUEST-READY" in f.read():
                    return time.monotonic() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    sys.exit(f"guest did not print TERN-GUEST-READY in {timeout_s}s (console: {path})")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fmt(xs, unit=""):
    xs = sorted(xs)
    return f"{statistics.median(xs):.2f}{unit} ({xs[0]:.2f}–{xs[-1]:.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--accel", default="tcg")
    a = ap.parse_args()

    env = dict(os.environ)
    sh(TERN, "lab", "down", "--prefix", PREFIX, "--dir", LABDIR, check=False)
    sh(TERN, "lab", "up", "--hosts", "1", "--prefix", PREFIX, "--dir", LABDIR,
       "--accel", a.accel, "--guest-dir", os.path.join(ROOT, "target", "guest"))
    env["TERN_CENTER"] = f"unix:{LABDIR}/center/center.sock"
    with open(f"{LABDIR}/admin.token") as f:
        env["TERN_TOKEN"] = f.read().strip()
    g = f"{LABDIR}/shared/guest"
    ns = f"{PREFIX}-h1"
    cmdline = "console=ttyS0 quiet ipv6.disable=1 tern.ip=10.78.0.{ip}/24 tern.serve=7000"
    tern_s, tern_rss, base_s, base_rss = [], [], [], []
    try:
        for i in range(a.runs):
            # tern: create, then time `tern vm start` to READY.
            name = f"boot{i}"
            sh(TERN, "vm", "create", name, "--cluster", "lab", "--host", "h1",
               "--vcpus", str(a.vcpus), "--memory-mib", str(a.memory_mib),
               "--kernel", f"{g}/vmlinuz", "--initrd", f"{g}/initramfs.img",
               "--cmdline", cmdline.format(ip=100 + i), "--mac", f"52:54:00:00:01:{i:02x}",
               env=env)
            vm = json.loads(sh(TERN, "vm", "show", name, "-o", "json", env=env))
            console = f"{LABDIR}/hosts/h1/vms/{vm['id']}/console.log"
            t0 = time.monotonic()
            sh(TERN, "vm", "start", name, env=env)
            tern_s.append(wait_ready(console, t0))
            pid = int(open(f"{LABDIR}/hosts/h1/vms/{vm['id']}/qemu.pid").read().strip())
            time.sleep(1.0)  # let the guest settle before reading RSS, as for the baseline
            tern_rss.append(rss_mib(pid))
            sh(TERN, "vm", "stop", "--force", name, env=env)
            sh(TERN, "vm", "delete", name, env=env)

            # plain QEMU: the same kernel, initramfs, size and a tap on the same bridge.
            tap = f"bq{i}"
            sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", tap, "master", "br0", "up")
            with tempfile.TemporaryDirectory() as d:
                log = os.path.join(d, "console.log")
                t0 = time.monotonic()
                p = subprocess.Popen([
                    "ip", "netns", "exec", ns, "qemu-system-x86_64", "-accel", a.accel,
                    "-machine", "q35", "-m", str(a.memory_mib), "-smp", str(a.vcpus),
                    "-kernel", f"{g}/vmlinuz", "-initrd", f"{g}/initramfs.img",
                    "-append", cmdline.format(ip=150 + i),
                    "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:00:02:{i:02x}",
                    "-serial", f"file:{log}", "-display", "none", "-nodefaults",
                    "-no-user-config"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    base_s.append(wait_ready(log, t0))
                    time.sleep(1.0)
                    # `ip netns exec` execs QEMU, so the pid is QEMU's.
                    base_rss.append(rss_mib(p.pid))
                finally:
                    p.kill()
                    p.wait()
            sh("ip", "netns", "exec", ns, "ip", "link", "del", tap, check=False)
    finally:
        sh(TERN, "lab", "down", "--prefix", PREFIX, "--dir", LABDIR, check=False)

    print(f"\n### bench/boot — {a.runs} runs, {a.vcpus} vCPU, {a.memory_mib} MiB, accel {a.accel}, "
          f"median (min–max)\n")
    print("| | start → TERN-GUEST-READY (s) | QEMU RSS after boot (MiB) |")
    print("| --- | --- | --- |")
    print(f"| tern (`tern vm start`) | {fmt(tern_s)} | {fmt(tern_rss)} |")
    print(f"| plain qemu-system-x86_64 | {fmt(base_s)} | {fmt(base_rss)} |")
    r_t = statistics.median(tern_s) / statistics.median(base_s)
    r_m = statistics.median(tern_rss) / statistics.median(base_rss)
    print(f"| ratio tern / plain | {r_t:.2f}× | {r_m:.2f}× |")


if __name__ == "__main__":
    main()
