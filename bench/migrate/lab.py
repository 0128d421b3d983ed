"""The benchmark's side of the lab: bringing it up and down, taps, link shaping and measuring,
background processes in namespaces, and the cleanup registry every one of them joins."""

import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# TERN_BENCH_BIN: a copy of the binary, so a rebuild during a long run changes nothing.
TERN = os.environ.get("TERN_BENCH_BIN") or os.path.join(ROOT, "target", "debug", "tern")
TERN_GUEST = os.path.join(ROOT, "target", "guest", "tern-guest")
PROBE = os.path.join(HERE, "probe.py")
BLAST_PORT = 5201


class BenchError(Exception):
    pass


def sh(*args, check=True, timeout=120):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(f"command failed ({r.returncode}): {' '.join(args)}\n{r.stdout}{r.stderr}")
    return r.stdout


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Cleanup:
    """Everything the run started, undone in reverse order (processes first, then taps, shaping,
    the lab). Runs on normal exit, on errors and on SIGINT/SIGTERM."""

    def __init__(self):
        self.steps = []

    def push(self, what, fn):
        token = object()
        self.steps.append((token, what, fn))
        return token

    def done(self, token):
        """The step ran by itself (e.g. a process that exited): forget it."""
        self.steps = [s for s in self.steps if s[0] is not token]

    def run_one(self, token):
        for s in list(self.steps):
            if s[0] is token:
                self.steps.remove(s)
                try:
                    s[2]()
                except Exception as e:  # cleanup must go on
                    log(f"cleanup {s[1]}: {e}")

    def run_all(self):
        while self.steps:
            _, what, fn = self.steps.pop()
            try:
                fn()
            except Exception as e:
                log(f"cleanup {what}: {e}")


CLEANUP = Cleanup()


def kill_proc(p, grace_s=3.0, sig=signal.SIGTERM):
    if p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(grace_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


class Proc:
    """A process in a namespace (`ip netns exec` execs it, so the pid is the program's), in its
    own session so a Ctrl-C reaches only the harness, which then stops it in order."""

    def __init__(self, ns, argv, stdout=None, stdin=None, name=None, nice=None):
        self.name = name or argv[0]
        if nice is not None:
            argv = ["nice", "-n", str(nice)] + argv
        self.out_path = stdout
        out = open(stdout, "w") if stdout else subprocess.PIPE
        self.p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, stdout=out,
                                  stderr=subprocess.STDOUT if stdout else subprocess.PIPE,
                                  stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                  text=True, start_new_session=True)
        if stdout:
            out.close()
        self.token = CLEANUP.push(f"process {self.name} ({self.p.pid})", lambda: kill_proc(self.p))

    @property
    def pid(self):
        return self.p.pid

    def stop(self, sig=signal.SIGTERM, grace_s=5.0):
        """Signals the process and waits; returns its stdout when it was piped."""
        out = None
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            out, _ = self.p.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, _ = self.p.communicate(timeout=5)
        CLEANUP.done(self.token)
        return None if self.out_path else out

    def alive(self):
        return self.p.poll() is None


class Lab:
    def __init__(self, prefix, labdir):
        self.prefix = prefix
        self.dir = labdir
        self.h = {1: f"{prefix}-h1", 2: f"{prefix}-h2"}
        self.mgmt_ip = {1: "10.77.0.11", 2: "10.77.0.12"}
        self.client = f"{prefix}-client"
        self.fab = f"{prefix}-fab"
        self.shaped = False

    def tern(self, *args, check=True, timeout=180):
        return sh(TERN, *args, check=check, timeout=timeout)

    def up(self, network_only=True):
        log(f"lab up: prefix {self.prefix}, dir {self.dir}")
        args = ["lab", "up", "--hosts", "2", "--prefix", self.prefix, "--dir", self.dir,
                "--guest-dir", os.path.join(ROOT, "target", "guest")]
        if network_only:
            args.append("--network-only")
        CLEANUP.push("lab", self.down)
        self.tern(*args)
        with open(os.path.join(self.dir, "lab.json")) as f:
            self.state = json.load(f)
        self.kernel = self.state["guest"]["kernel"]
        self.initrd = self.state["guest"]["initrd"]
        self.wait_reachable(1, self.mgmt_ip[2])
        self.wait_reachable(2, self.mgmt_ip[1])

    def down(self):
        log("lab down")
        self.tern("lab", "down", "--prefix", self.prefix, "--dir", self.dir, check=False)

    def wait_reachable(self, host, ip, timeout_s=20.0):
        """veth carrier comes up about a second late: wait until `ip` answers from host."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = subprocess.run(["ip", "netns", "exec", self.h[host], "ping", "-c1", "-W1", ip],
                               capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise BenchError(f"{ip} does not answer from {self.h[host]} within {timeout_s}s")

    def shape(self, rate_mbit):
        """Shapes both hosts' migration links (tc tbf, each direction) or removes shaping."""
        for host in ("h1", "h2"):
            if rate_mbit:
                self.tern("lab", "link", "--dir", self.dir, "shape", host,
                          "--rate-mbit", str(rate_mbit))
            else:
                self.tern("lab", "link", "--dir", self.dir, "unshape", host)
        self.shaped = bool(rate_mbit)
        self.wait_reachable(1, self.mgmt_ip[2])

    def tap_add(self, host, tap):
        ns = self.h[host]
        sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap")
        token = CLEANUP.push(f"tap {ns}/{tap}", lambda: self.tap_del(host, tap))
        sh("ip", "-n", ns, "link", "set", tap, "master", "br0", "up")
        return token

    def tap_del(self, host, tap):
        sh("ip", "-n", self.h[host], "link", "del", tap, check=False)

    def blast(self, src, dst, seconds):
        """Usable TCP bandwidth from host src to host dst on the migration network, Mbit/s."""
        recv = Proc(self.h[dst], ["python3", PROBE, "blast-recv", "--bind",
                                  f"{self.mgmt_ip[dst]}:{BLAST_PORT}"], name="blast-recv")
        if recv.p.stdout.readline().strip() != "ready":
            recv.stop()
            raise BenchError("bandwidth receiver did not start")
        sh("ip", "netns", "exec", self.h[src], "python3", PROBE, "blast-send", "--addr",
           f"{self.mgmt_ip[dst]}:{BLAST_PORT}", "--seconds", str(seconds),
           timeout=seconds + 30)
        recv.p.wait(30)
        CLEANUP.done(recv.token)
        return json.loads(recv.p.stdout.read())["mbit_s"]

    def measure_link(self, seconds=3.0):
        """Warms the link up, then measures it both ways; returns the slower direction."""
        self.blast(1, 2, 1.0)
        a = self.blast(1, 2, seconds)
        b = self.blast(2, 1, seconds)
        log(f"link: h1→h2 {a:.0f} Mbit/s, h2→h1 {b:.0f} Mbit/s")
        return min(a, b), {"h1_h2_mbit_s": a, "h2_h1_mbit_s": b}

    def guest_stats(self, ip, port=7000):
        out = sh("ip", "netns", "exec", self.client, TERN_GUEST, "client", "--addr",
                 f"{ip}:{port}", "--stats", timeout=30)
        return json.loads(out)
