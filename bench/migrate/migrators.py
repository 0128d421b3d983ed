"""Migrators: each boots a VM its own way and moves it from one lab host to the other, returning
the same record, so the harness can put them side by side.

A migrator has `name`, `boot(case, ip, mac) -> vm`, `migrate(vm, dst_host, deadline_s,
variant) -> record`, `finish(vm)` (clean up what the last move left behind, after the probes
stopped) and `shutdown(vm)`. The vm object has `.host` (1 or 2, where it runs now), `.ip`,
`.mac`, `.console` (serial log path of the QEMU running it). The record has (None when the
migrator cannot know): converged, e2e_s, qemu_total_ms, qemu_downtime_ms, qemu_setup_ms,
pause_ms (guest stopped on the source → running on the destination, from QMP STOP/RESUME),
wire_bytes, passes, mbps, t_cmd / t_stop / t_resume / t_done (CLOCK_MONOTONIC s), error.

`baseline` is plain QEMU as a libvirt or Proxmox user gets it: default capabilities and
parameters, `migrate` to a destination started with `-incoming tcp:IP:PORT`. A `tern`
migrator (`tern vm create/start`, `tern vm migrate` through the CLI) goes next to it once
`tern vm migrate` exists; see README.md.

A case with an `os` entry (the pgbench workload) boots the Debian OS image from a linked clone
instead of the test guest's kernel: `os` = {disk: the clone, on the lab's shared storage;
user_data, ssh_key_pub: files; ready: the console line that says the guest is ready}. tern
writes its own cloud-init seed from `tern vm create`'s options; the baseline gets one made here
with Debian's FAT tools, carrying the same documents.
"""

import json
import os
import subprocess
import time

from lab import CLEANUP, BenchError, Proc, log, sh
from qmp import Qmp, QmpError

BASE_PORT = 49152
TERMINAL = ("completed", "failed", "cancelled")


def cmdline(case, ip):
    c = f"console=ttyS0 quiet ipv6.disable=1 tern.ip={ip}/24 tern.serve=7000"
    if case["working_set_mib"]:
        c += f" tern.mem={case['working_set_mib']} tern.dirty={case['dirty_mib_s']}"
    return c


class QemuVm:
    """One guest, run by one plain QEMU process at a time (source, then destination)."""

    def __init__(self, lab, case, ip, mac, rundir, vcpus):
        self.lab, self.case, self.ip, self.mac, self.rundir = lab, case, ip, mac, rundir
        self.vcpus = vcpus
        self.host = None
        self.proc = None
        self.qmp = None
        self.tap_token = None
        self.console = None
        self.seq = 0

    def boot_args(self):
        """What the guest boots: the test guest's kernel, or (os cases) firmware booting the
        clone, with the cloud-init seed as a second disk. Both sides open the same files (shared
        storage); QEMU hands the disk over at the switchover."""
        o = self.case.get("os")
        if not o:
            return ["-kernel", self.lab.kernel, "-initrd", self.lab.initrd,
                    "-append", cmdline(self.case, self.ip)]
        return ["-drive", f"file={o['disk']},if=virtio,cache=none,format=qcow2",
                "-drive", f"file={o['seed']},if=virtio,format=raw,readonly=on"]

    def argv(self, tag, incoming=None):
        """The command line, identical on both sides but for the incoming URI and the paths."""
        a = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35",
             "-m", str(self.case["memory_mib"]), "-smp", str(self.vcpus),
             *self.boot_args(),
             "-netdev", "tap,id=n0,ifname=vmtap0,script=no,downscript=no",
             "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}",
             "-serial", f"file:{self.rundir}/{tag}.console",
             "-qmp", f"unix:{self.rundir}/{tag}.qmp,server=on,wait=off",
             "-display", "none", "-nodefaults", "-no-user-config"]
        if incoming:
            a += ["-incoming", incoming]
        return a

    def start(self, host, incoming=None):
        """Starts a QEMU for this VM in host's namespace; returns (proc, qmp, tap token)."""
        self.seq += 1
        tag = f"q{self.seq}-h{host}"
        tap = self.lab.tap_add(host, "vmtap0")
        proc = Proc(self.lab.h[host], self.argv(tag, incoming),
                    stdout=f"{self.rundir}/{tag}.log", name=f"qemu {tag}")
        try:
            q = Qmp(f"{self.rundir}/{tag}.qmp")
        except QmpError:
            proc.stop()
            CLEANUP.run_one(tap)
            raise
        return proc, q, tap, f"{self.rundir}/{tag}.console"

    def stop_qemu(self, proc, q, tap):
        try:
            q.cmd("quit", timeout_s=5)
        except (QmpError, OSError):
            pass
        q.close()
        proc.stop(grace_s=5)
        CLEANUP.run_one(tap)


def wait_ready(console, marker="TERN-GUEST-READY", timeout_s=180.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(console, "rb") as f:
                text = f.read()
            if marker.encode() in text:
                return
            if b"TERN-GUEST-ERROR" in text:
                raise BenchError(f"guest failed to start: see {console}")
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise BenchError(f"no {marker} within {timeout_s}s (console: {console})")


def ready_wait(case):
    """(marker, timeout) for wait_ready: a full OS under TCG boots in ~30 s alone, slower while
    the machine is busy."""
    o = case.get("os")
    return (o["ready"], 300.0) if o else ("TERN-GUEST-READY", 180.0)


def make_seed(o, ip, mac):
    """A NoCloud seed for the baseline, with the documents tern's host writes for the same
    options (host name, key, static address, user data); returns its path, next to the clone."""
    seed = os.path.splitext(o["disk"])[0] + "-seed.img"
    d = seed + ".d"
    os.makedirs(d, exist_ok=True)
    with open(o["ssh_key_pub"]) as f:
        key = f.read().strip()
    with open(o["user_data"]) as f:
        user_data = f.read()
    docs = {
        "meta-data": {"instance-id": "bench-" + os.path.basename(os.path.splitext(o["disk"])[0]),
                      "local-hostname": "db",
                      "public-keys": [key]},
        "network-config": {"version": 2, "ethernets": {"nic0": {
            "match": {"macaddress": mac.lower()}, "addresses": [f"{ip}/24"]}}},
    }
    for name, doc in docs.items():
        with open(os.path.join(d, name), "w") as f:
            json.dump(doc, f)  # JSON is YAML
    with open(os.path.join(d, "user-data"), "w") as f:
        f.write(user_data)
    if os.path.exists(seed):
        os.unlink(seed)
    sh("truncate", "-s", "1M", seed)
    sh("mkfs.vfat", "-n", "CIDATA", seed)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    r = subprocess.run(["mcopy", "-i", seed] + [os.path.join(d, n) for n in
                       ("meta-data", "user-data", "network-config")] + ["::/"],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BenchError(f"mcopy into the seed failed: {r.stderr}")
    return seed


class Baseline:
    """Plain QEMU migration with QEMU's defaults."""

    name = "baseline"

    def __init__(self, lab, rundir, vcpus=1):
        self.lab, self.rundir, self.vcpus = lab, rundir, vcpus
        self.defaults = None

    def boot(self, case, ip, mac):
        d = os.path.join(self.rundir, f"vm-{case['id']}")
        os.makedirs(d, exist_ok=True)
        if case.get("os"):
            case["os"]["seed"] = make_seed(case["os"], ip, mac)
        vm = QemuVm(self.lab, case, ip, mac, d, self.vcpus)
        vm.proc, vm.qmp, vm.tap_token, vm.console = vm.start(1)
        vm.host = 1
        wait_ready(vm.console, *ready_wait(case))
        if self.defaults is None:
            self.defaults = {
                "parameters": vm.qmp.cmd("query-migrate-parameters"),
                "capabilities": {c["capability"]: c["state"]
                                 for c in vm.qmp.cmd("query-migrate-capabilities")},
            }
        return vm

    def finish(self, vm):
        """Quits the paused source of the last completed migration."""
        old = getattr(vm, "old", None)
        if old:
            vm.stop_qemu(*old)
            vm.old = None

    def shutdown(self, vm):
        self.finish(vm)
        if vm.proc is not None:
            vm.stop_qemu(vm.proc, vm.qmp, vm.tap_token)
            vm.proc = None

    def migrate(self, vm, dst, deadline_s, variant="default", on_pre_switchover=None):
        """Moves vm to host dst. variant `default`: plain `migrate`; `pbs`: capability
        pause-before-switchover (and events), `on_pre_switchover(dst, dst_qmp)` runs while the
        source is paused at pre-switchover (returns the monotonic time it acted), then
        `migrate-continue`."""
        src = vm.host
        port = BASE_PORT + vm.seq + 1
        uri = f"tcp:{self.lab.mgmt_ip[dst]}:{port}"
        dproc, dq, dtap, dconsole = vm.start(dst, incoming=uri)
        sq = vm.qmp
        rec = {"variant": variant, "from": f"h{src}", "to": f"h{dst}", "converged": False,
               "error": None}
        try:
            if variant == "pbs":
                sq.cmd("migrate-set-capabilities", capabilities=[
                    {"capability": "pause-before-switchover", "state": True},
                    {"capability": "events", "state": True}])
            # The destination listens once its QMP answers (-incoming binds before the monitor).
            if dq.cmd("query-status")["status"] != "inmigrate":
                raise BenchError("destination is not waiting for an incoming migration")
            ev0 = len(sq.events)
            t_cmd = time.monotonic()
            sq.cmd("migrate", uri=uri)
            rec["t_cmd"] = t_cmd
            deadline = t_cmd + deadline_s
            info, last_active = {}, {}
            while True:
                got = sq.wait_event(
                    lambda e: e.get("event") == "MIGRATION"
                    and e["data"]["status"] in ("pre-switchover",) + TERMINAL,
                    timeout_s=0.05, since_index=ev0)
                if got and got[1]["data"]["status"] == "pre-switchover":
                    ev0 = sq.events.index(got) + 1
                    rec["t_pre_switchover"] = got[0]
                    if on_pre_switchover:
                        rec["t_hook"] = on_pre_switchover(dst, dq)
                    sq.cmd("migrate-continue", state="pre-switchover")
                    rec["t_continue"] = time.monotonic()
                info = sq.cmd("query-migrate")
                status = info.get("status")
                if status in TERMINAL:
                    break
                if "ram" in info:
                    last_active = info
                if time.monotonic() > deadline:
                    log(f"deadline {deadline_s:.0f}s reached: migrate_cancel")
                    sq.cmd("migrate_cancel")
                    t_end = time.monotonic() + 30
                    while sq.cmd("query-migrate").get("status") not in TERMINAL:
                        if time.monotonic() > t_end:
                            raise BenchError("migrate_cancel did not finish in 30s")
                        time.sleep(0.05)
                    # A cancelled migration reports no figures: keep the last ones it had.
                    info = dict(last_active, status=sq.cmd("query-migrate").get("status"))
                    rec["error"] = f"not converged within {deadline_s:.0f}s (cancelled)"
                    break
            rec["t_done"] = time.monotonic()
            ram = info.get("ram", {})
            rec.update(qemu_status=info.get("status"), qemu_total_ms=info.get("total-time"),
                       qemu_downtime_ms=info.get("downtime"),
                       qemu_setup_ms=info.get("setup-time"), wire_bytes=ram.get("transferred"),
                       passes=ram.get("dirty-sync-count"), mbps=ram.get("mbps"),
                       remaining_bytes=ram.get("remaining"),
                       expected_downtime_ms=info.get("expected-downtime"),
                       query_migrate=info)
            if info.get("status") == "completed":
                got = dq.wait_event(lambda e: e.get("event") == "RESUME", timeout_s=60)
                if got is None:
                    raise BenchError("destination did not resume within 60s")
                rec["t_resume"] = got[0]
                stop = sq.first_event("STOP", since_s=t_cmd)
                rec["t_stop"] = stop[0] if stop else None
                rec["converged"] = True
                rec["e2e_s"] = rec["t_resume"] - t_cmd
                rec["pause_ms"] = ((rec["t_resume"] - rec["t_stop"]) * 1000
                                   if rec["t_stop"] else None)
                # The paused source goes away once the destination runs (as with libvirt),
                # but only in finish(): on this shared 2-core machine its exit would steal
                # CPU from the destination guest while the probes are timing it.
                vm.old = (vm.proc, sq, vm.tap_token)
                vm.proc, vm.qmp, vm.tap_token, vm.console = dproc, dq, dtap, dconsole
                vm.host = dst
            else:
                if rec["error"] is None:
                    rec["error"] = f"migration {info.get('status')}: {info.get('error-desc')}"
                if sq.cmd("query-status")["status"] != "running":
                    sq.cmd("cont")
                vm.stop_qemu(dproc, dq, dtap)
            if variant == "pbs":
                sq_now = vm.qmp
                sq_now.cmd("migrate-set-capabilities", capabilities=[
                    {"capability": "pause-before-switchover", "state": False},
                    {"capability": "events", "state": False}])
            return rec
        except BaseException:
            if vm.proc is not dproc:
                vm.stop_qemu(dproc, dq, dtap)
            raise


class Tern:
    """tern's own migration, driven through the CLI in a full lab (center + agents).

    Boot: `tern vm create` + `tern vm start` on h1. Move: `tern vm migrate NAME --to hN
    --detach -o json` (a `vm_migrate` task), then `tern task wait ID -o json`; the task's
    `result` is tern_api::migration::MigrationResult, which carries QEMU's STOP and RESUME
    times (so end-to-end and the pause are measured as for the baseline); the agent owns QEMU's
    QMP socket, so the frame analysis is not available here. Written against the CLI shape above before `tern vm migrate`
    existed: adjust `migrate()` when it lands.
    """

    name = "tern"
    needs_full_lab = True

    def __init__(self, lab, rundir, vcpus=1):
        self.lab, self.rundir, self.vcpus = lab, rundir, vcpus
        self.defaults = None
        # VMs (one per case) moved at least once: the harness reshapes the link between
        # cases, so each case's first move measures it again (`--probe-link`), and the
        # others use the figure tern remembers per host pair, as they would in a cluster.
        self.moved = set()

    @classmethod
    def check(cls):
        """Raises BenchError when this tern cannot migrate yet (before any lab is built)."""
        r = subprocess.run([cls._tern(), "vm", "migrate", "--help"], capture_output=True)
        if r.returncode != 0:
            raise BenchError("`tern vm migrate` does not exist yet: run --migrators baseline")

    @staticmethod
    def _tern():
        from lab import TERN
        return TERN

    def cli(self, group, *args, timeout=600, check=True):
        """`tern GROUP --lab-dir DIR ARGS...` (the lab directory is an option of each group)."""
        return sh(self._tern(), group, "--lab-dir", self.lab.dir, *args, timeout=timeout,
                  check=check)

    def boot(self, case, ip, mac):
        name = f"bench-{case['id']}"

        class Vm:
            pass

        vm = Vm()
        vm.name, vm.ip, vm.mac, vm.host, vm.qmp = name, ip, mac, 1, None
        o = case.get("os")
        if o:
            boot = ["--boot-disk", "--disk", f"{o['disk']},format=qcow2", "--ip", f"{ip}/24",
                    "--ssh-key", o["ssh_key_pub"], "--user-data", o["user_data"]]
        else:
            boot = ["--kernel", self.lab.kernel, "--initrd", self.lab.initrd, "--cmdline",
                    cmdline(case, ip)]
        self.cli("vm", "create", name, "--cluster", "lab", "--host", "h1", "--vcpus",
                 str(self.vcpus), "--memory-mib", str(case["memory_mib"]), *boot,
                 "--mac", mac)
        CLEANUP.push(f"tern vm {name}", lambda: self._delete(name))
        vm.id = json.loads(self.cli("vm", "show", name, "-o", "json"))["id"]
        self.cli("vm", "start", name)
        vm.console = self._console(vm)
        wait_ready(vm.console, *ready_wait(case))
        return vm

    def _console(self, vm):
        return os.path.join(self.lab.dir, "hosts", f"h{vm.host}", "vms", vm.id, "console.log")

    def _delete(self, name):
        self.cli("vm", "stop", "--force", name, check=False)
        self.cli("vm", "delete", name, check=False)

    def finish(self, vm):
        pass

    def shutdown(self, vm):
        self._delete(vm.name)

    def migrate(self, vm, dst, deadline_s, variant="default", on_pre_switchover=None):
        if variant != "default" or on_pre_switchover is not None:
            raise BenchError("the tern migrator has no experiment variants")
        rec = {"variant": "tern", "from": f"h{vm.host}", "to": f"h{dst}", "converged": False,
               "error": None}
        rec["t_cmd"] = time.monotonic()
        probe = [] if vm.name in self.moved else ["--probe-link"]
        self.moved.add(vm.name)
        task = json.loads(self.cli("vm", "migrate", vm.name, "--to", f"h{dst}",
                                   "--deadline", f"{int(deadline_s)}s", "--detach",
                                   *probe, "-o", "json"))
        task = json.loads(self.cli("task", "wait", task["id"], "-o", "json",
                                   timeout=deadline_s + 120))
        rec["t_done"] = time.monotonic()
        res = task.get("result") or {}
        rec.update(qemu_total_ms=res.get("total_ms"), qemu_downtime_ms=res.get("downtime_ms"),
                   qemu_setup_ms=res.get("setup_ms"), wire_bytes=res.get("bytes"),
                   passes=res.get("passes"), tern_result=res, pause_ms=res.get("pause_ms"))
        if res.get("status") == "completed":
            rec["converged"] = True
            rec["e2e_s"] = rec["t_done"] - rec["t_cmd"]
            # QEMU's STOP (source) and RESUME (destination), as the agents report them on the
            # wall clock: on the monotonic clock like the baseline's, and the same columns.
            if res.get("stopped_at") and res.get("resumed_at"):
                from datetime import datetime
                wall_to_mono = time.time() - time.monotonic()
                at = lambda k: datetime.fromisoformat(res[k]).timestamp() - wall_to_mono
                rec["t_stop"], rec["t_resume"] = at("stopped_at"), at("resumed_at")
                rec["pause_ms"] = (rec["t_resume"] - rec["t_stop"]) * 1000
                rec["e2e_s"] = rec["t_resume"] - rec["t_cmd"]
            vm.host = dst
            vm.console = self._console(vm)
        else:
            rec["error"] = task.get("error") or res.get("error") or "rolled back"
        rec["encrypted"] = bool((res.get("settings") or {}).get("encrypted"))
        # The task's events (timed decisions, passes), to place the client's waits in the move.
        events = json.loads(self.cli("event", "list", "--vm", vm.name, "--limit", "200", "-o",
                                     "json", check=False) or "[]")
        rec["events"] = [[e["time"], e["message"]] for e in events if e.get("task") == task["id"]]
        return rec


class TernPlain(Tern):
    """tern with the lab cluster's migration encryption disabled (the default is required): the
    other side of the encryption axis, booted and migrated in the same lab as `tern`."""

    name = "tern-plain"

    def _encryption(self, mode, check=True):
        self.cli("cluster", "set-migration", "lab", "--encryption", mode, check=check)

    def boot(self, case, ip, mac):
        self._encryption("disabled")
        self._restore = CLEANUP.push("tern cluster encryption back to required",
                                     lambda: self._encryption("required", check=False))
        return super().boot(case, ip, mac)

    def shutdown(self, vm):
        super().shutdown(vm)
        self._encryption("required")
        CLEANUP.done(self._restore)
