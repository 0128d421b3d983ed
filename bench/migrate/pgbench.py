"""The `pgbench` workload: a Debian 12 VM (the OS image of guest/build-os.sh, booted by SeaBIOS
from a linked clone, configured by cloud-init) running PostgreSQL 15 under pgbench's TPC-B-like
load from the client namespace, moved while an SSH session to it echoes keystrokes.

Per migrator: a fresh clone of the image on the lab's shared storage (so every migrator starts
from the same disk), one boot, `pgbench -i`, then every run moves the VM to the other host
LEAD_S seconds into a pgbench run of --pg-seconds. Each run records, on the harness's
CLOCK_MONOTONIC: what the migrator reports (end to end, QEMU downtime, STOP→RESUME); from
pgbench's per-transaction log, the longest transaction and the throughput around the switchover
against before the migrate command; from `probe.py ssh-echo`, the longest gap between the
echoes of a line typed every 10 ms. pgbench exiting non-zero (a client aborted) or reporting
failed transactions makes the run a benchmark error.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import time

from lab import CLEANUP, PROBE, ROOT, BenchError, Proc, log, sh

OS_IMAGE = os.path.join(ROOT, "target", "os", "debian-12.qcow2")
MEMORY_MIB = 1024
SCALE = 2
CLIENTS = 2
# The move starts LEAD_S into the load; the "before" window is the BEFORE_S ending at the migrate
# command, so pgbench's first seconds (connections, cold caches) stay out of it.
LEAD_S = 12.0
BEFORE_S = 10.0
# The window "around the move": from AROUND_S before the source's STOP to AROUND_S after the
# destination's RESUME (10 s plus the pause).
AROUND_S = 5.0
SSH_INTERVAL_MS = 10
PROBE_NICE = -10  # as harness.PROBE_NICE: the users are not starved by the QEMUs

# What os_guest.rs's PostgreSQL test gives cloud-init (see the file).
USER_DATA_FILE = os.path.join(ROOT, "guest", "cloud-init", "postgresql-bench.yaml")
READY = "TERN-DB-READY"


# ---------------------------------------------------------------- the guest

def prepare(lab, rundir):
    """The template on the lab's shared storage, an SSH key and the user data; returns what
    every clone's `os` entry shares."""
    if not os.path.isfile(OS_IMAGE):
        raise BenchError(f"{OS_IMAGE} missing: bash guest/build-os.sh target/os")
    shared = os.path.join(lab.dir, "shared")
    os.makedirs(os.path.join(shared, "images"), exist_ok=True)
    os.makedirs(os.path.join(shared, "vms"), exist_ok=True)
    template = os.path.join(shared, "images", "debian-12.qcow2")
    # Linked afresh every time (a link left by an earlier run would keep a rebuilt image's
    # old inode); clones only read it, so no copy is needed on the same file system.
    if os.path.exists(template):
        os.unlink(template)
    try:
        os.link(OS_IMAGE, template)
    except OSError:
        sh("cp", OS_IMAGE, template, timeout=600)
    key = os.path.join(rundir, "id_ed25519")
    if not os.path.exists(key):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-migrate", "-f", key)
    user_data = USER_DATA_FILE
    return {"shared": shared, "key": key, "ssh_key_pub": key + ".pub", "user_data": user_data,
            "ready": READY}


def clone(shared, name):
    """A fresh linked clone (4 GiB, cloud-init grows the root file system into it); removed at
    the end, after the VM using it (cleanup runs in reverse)."""
    disk = os.path.join(shared, "vms", f"{name}.qcow2")
    for old in (disk, disk[:-len(".qcow2")] + "-seed.img"):
        if os.path.exists(old):
            os.unlink(old)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
       "../images/debian-12.qcow2", disk, "4G")
    CLEANUP.push(f"clone {disk}", lambda: remove_clone(disk))
    return disk


def remove_clone(disk):
    seed = disk[:-len(".qcow2")] + "-seed.img"  # the baseline's (migrators.make_seed)
    for p in (disk, seed):
        if os.path.exists(p):
            os.unlink(p)
    shutil.rmtree(seed + ".d", ignore_errors=True)


def ssh_argv(key, ip, remote):
    return ["ssh", "-i", key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=5", f"debian@{ip}", remote]


def in_client(lab, *argv, check=True, timeout=120):
    return sh("ip", "netns", "exec", lab.client, *argv, check=check, timeout=timeout)


def wait_login(lab, key, ip, timeout_s=120.0):
    """Until an SSH login works (sshd starts before cloud-init's final stage, but its key for
    the user is written by cloud-init)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = subprocess.run(["ip", "netns", "exec", lab.client, *ssh_argv(key, ip, "true")],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"no SSH login to {ip} within {timeout_s:.0f}s: {r.stderr}")
        time.sleep(1.0)


def pg_env():
    return ["env", "PGPASSWORD=bench", "PGCONNECT_TIMEOUT=10"]


def db_args(ip):
    return ["-h", ip, "-U", "bench", "bench"]


def pg_init(lab, ip):
    t0 = time.monotonic()
    in_client(lab, *pg_env(), "pgbench", "-i", "-s", str(SCALE), "-q", *db_args(ip),
              timeout=600)
    log(f"  pgbench -i -s {SCALE}: {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------- pgbench's output

def parse_report(text):
    """pgbench's summary: transactions processed, failed, tps; whether a client aborted."""
    r = {"processed": None, "failed": None, "tps": None,
         "aborted_lines": [l for l in text.splitlines() if "aborted" in l.lower()]}
    for line in text.splitlines():
        if line.startswith("number of transactions actually processed:"):
            r["processed"] = int(line.split(":")[1].split("/")[0].split()[0])
        elif line.startswith("number of failed transactions:"):
            r["failed"] = int(line.split(":")[1].split()[0])
        elif line.startswith("tps = "):
            r["tps"] = float(line.split()[2])
    return r


def read_txlog(prefix, wall_to_mono):
    """Every transaction of pgbench's per-transaction logs (one file per thread:
    `client_id transaction_no latency_us script_no epoch_s epoch_us [lag] [retries]`), as
    (end time on CLOCK_MONOTONIC, latency ms or None when it failed), in time order."""
    txs = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                w = line.split()
                if len(w) < 6:
                    continue
                end = int(w[4]) + int(w[5]) / 1e6 - wall_to_mono
                txs.append((end, int(w[2]) / 1000.0 if w[2].isdigit() else None))
    return sorted(txs)


def window(txs, lo, hi):
    """Throughput (committed transactions per second) and longest transaction (ms, with its end
    time) among the transactions that ended in [lo, hi]."""
    inside = [(t, lat) for t, lat in txs if lo <= t <= hi and lat is not None]
    longest = max(inside, key=lambda x: x[1], default=(None, None))
    return {"tps": len(inside) / (hi - lo) if hi > lo else None, "max_ms": longest[1],
            "max_end": longest[0], "n": len(inside)}


# ---------------------------------------------------------------- one run

class Session:
    """The SSH keystroke probe (probe.py ssh-echo) in the client namespace."""

    def __init__(self, lab, key, ip, path):
        self.path = path
        self.proc = Proc(lab.client, ["python3", PROBE, "ssh-echo", "--key", key, "--dest",
                                      f"debian@{ip}", "--interval-ms", str(SSH_INTERVAL_MS)],
                         stdout=path, name="ssh-echo", nice=PROBE_NICE)
        deadline = time.monotonic() + 40
        while "ready" not in self.lines():
            if not self.proc.alive() or time.monotonic() > deadline:
                self.proc.stop()
                raise BenchError(f"the SSH session did not open: {self.text()!r}")
            time.sleep(0.05)

    def text(self):
        with open(self.path) as f:
            return f.read()

    def lines(self):
        return self.text().splitlines()

    def stop(self):
        self.proc.stop(signal.SIGTERM, grace_s=10)
        for line in reversed(self.lines()):
            if line.startswith("{"):
                return json.loads(line)
        raise BenchError(f"ssh-echo gave no report: {self.text()!r}")


def start_load(lab, ip, seconds, rundir, tag):
    log_prefix = os.path.join(rundir, f"{tag}-pgb")
    out = os.path.join(rundir, f"{tag}.pgbench")
    proc = Proc(lab.client, [*pg_env(), "pgbench", "-c", str(CLIENTS), "-j", "1",
                             "-T", str(seconds), "-P", "1", "-l", f"--log-prefix={log_prefix}",
                             *db_args(ip)], stdout=out, name="pgbench", nice=PROBE_NICE)
    return proc, out, log_prefix


def wait_load(proc, timeout_s):
    try:
        code = proc.p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop(signal.SIGKILL)
        raise BenchError(f"pgbench still running {timeout_s:.0f}s after it should have ended")
    CLEANUP.done(proc.token)
    return code


def measured_run(lab, mig, vm, dst, a, rundir, tag, key):
    """One move under pgbench load with the SSH session open; returns the full record."""
    session = Session(lab, key, vm.ip, os.path.join(rundir, f"{tag}.ssh"))
    load = None
    try:
        load, out, log_prefix = start_load(lab, vm.ip, a.pg_seconds, rundir, tag)
        t_load = time.monotonic()
        time.sleep(max(0.0, t_load + LEAD_S - time.monotonic()))
        rec = mig.migrate(vm, dst, a.deadline_s_per_gib * MEMORY_MIB / 1024)
        code = wait_load(load, a.pg_seconds + 60)
    finally:
        if load is not None and load.alive():
            load.stop(signal.SIGKILL)
        ssh = session.stop()
        mig.finish(vm)
    wall_to_mono = time.time() - time.monotonic()
    with open(out) as f:
        report = parse_report(f.read())
    rec.update(pg_exit=code, pg_processed=report["processed"], pg_failed=report["failed"],
               pg_tps=report["tps"], pg_aborted=report["aborted_lines"], ssh=ssh,
               t_load=t_load, pg_end=t_load + a.pg_seconds, loadavg=os.getloadavg())
    rec["ssh_gap_ms"] = ssh.get("longest_gap_ms")
    rec.update(analyze(rec, read_txlog(log_prefix, wall_to_mono)))
    rec["errors"] = run_errors(rec)
    return rec


def analyze(rec, txs):
    """pgbench's figures around the move against before it, and where the worst moments fell
    (ms from the source's STOP, to see they are the move's)."""
    if not rec.get("converged") or not txs:
        return {"pg_transactions_logged": len(txs)}
    t_cmd = rec["t_cmd"]
    # tern reports STOP and RESUME from its agents; without them, the command to the end.
    t_stop = rec.get("t_stop") or t_cmd
    t_resume = rec.get("t_resume") or rec.get("t_done")
    before = window(txs, t_cmd - BEFORE_S, t_cmd)
    around = window(txs, t_stop - AROUND_S, t_resume + AROUND_S)
    whole = window(txs, txs[0][0], txs[-1][0])
    ssh = rec["ssh"]

    def from_stop(t):
        return None if t is None else (t - t_stop) * 1000

    return {
        "pg_transactions_logged": len(txs),
        "pg_failed_logged": sum(1 for _, lat in txs if lat is None),
        "pg_tps_before": before["tps"], "pg_tps_around": around["tps"],
        "pg_tps_kept": around["tps"] / before["tps"] if before["tps"] else None,
        "pg_max_lat_ms": around["max_ms"], "pg_max_lat_end_ms": from_stop(around["max_end"]),
        "pg_max_lat_before_ms": before["max_ms"],
        "pg_max_lat_run_ms": whole["max_ms"], "pg_max_lat_run_end_ms": from_stop(whole["max_end"]),
        "pg_window_fits": t_cmd - BEFORE_S >= rec["t_load"]
        and t_resume + AROUND_S <= rec["pg_end"],
        "ssh_gap_start_ms": from_stop(ssh.get("longest_gap_start")),
        # The noise floor on this shared machine: the longest echo gap in the 10 s before the
        # migrate command (the probe lists only gaps above 30 ms: none means ≤ 30).
        "ssh_gap_before_ms": max([(b - a) * 1000 for a, b in ssh.get("gaps", [])
                                  if t_cmd - BEFORE_S <= a and b <= t_cmd], default=None),
    }


def run_errors(rec):
    """What makes a run a benchmark error rather than a measurement."""
    e = []
    if not rec.get("converged"):
        e.append(f"migration: {rec.get('error')}")
    if rec.get("pg_exit") != 0 or rec.get("pg_aborted"):
        e.append(f"pgbench exit {rec.get('pg_exit')} {'; '.join(rec.get('pg_aborted') or [])}")
    if rec.get("pg_failed") is None or rec["pg_failed"] > 0 or rec.get("pg_failed_logged"):
        e.append(f"pgbench failed transactions: {rec.get('pg_failed')}")
    if rec.get("converged") and not rec.get("pg_window_fits"):
        e.append("the windows do not fit in the pgbench run: raise --pg-seconds")
    ssh = rec.get("ssh") or {}
    if not ssh.get("alive") or ssh.get("lost"):
        e.append(f"SSH session alive {ssh.get('alive')}, lines lost {ssh.get('lost')}")
    return e


def summary(rec):
    def v(key, fmt="{:.0f}"):
        x = rec.get(key)
        return "?" if x is None else fmt.format(x)

    s = (f"e2e {v('e2e_s', '{:.1f}')}s downtime {v('qemu_downtime_ms')}ms pause "
         f"{v('pause_ms')}ms; pgbench longest {v('pg_max_lat_ms')}ms tps {v('pg_tps_around')} "
         f"vs {v('pg_tps_before')} before, failed {v('pg_failed')} exit {v('pg_exit')}; "
         f"ssh gap {v('ssh_gap_ms')}ms")
    return s + ("" if not rec["errors"] else " ERRORS: " + "; ".join(rec["errors"]))


# ---------------------------------------------------------------- the workload

def make_case(link_mbit, link_measured):
    from harness import link_name  # harness imports this module: import it late
    return {"id": f"pg-{link_mbit}", "memory_mib": MEMORY_MIB, "working_set_mib": 0,
            "dirty_mib_s": 0, "link_mbit": link_mbit, "link_measured_mbit": link_measured,
            "label": f"Debian 12 + PostgreSQL 15 under pgbench, {link_name(link_mbit)}"}


def run(a, lab, rundir, out, meta, migrators, ip, mac):
    """Every link × migrator: a fresh clone, one boot, a.runs moves alternating direction."""
    from harness import link_name
    base = prepare(lab, rundir)
    meta.update(pgbench={"scale": SCALE, "clients": CLIENTS, "seconds": a.pg_seconds,
                         "lead_s": LEAD_S, "before_s": BEFORE_S, "around_s": AROUND_S,
                         "ssh_interval_ms": SSH_INTERVAL_MS, "memory_mib": MEMORY_MIB})
    out.write(json.dumps({"kind": "pgbench-meta", **meta["pgbench"]}) + "\n")
    rows = []
    for link in a.links:
        lab.shape(link)
        bw, detail = lab.measure_link()
        meta["links"][link] = bw
        out.write(json.dumps({"kind": "link", "link_mbit": link, **detail}) + "\n")
        for name in a.migrators:
            mig = migrators[name](lab, rundir, a.vcpus)
            case = make_case(link, bw)
            case["os"] = {"disk": clone(base["shared"], f"pg-{name}-{link}"),
                          **{k: base[k] for k in ("user_data", "ssh_key_pub", "ready")}}
            log(f"pgbench, {link_name(link)}, {name}: booting Debian")
            t0 = time.monotonic()
            vm = mig.boot(case, ip, mac)
            try:
                log(f"  {READY} {time.monotonic() - t0:.1f}s after the start")
                if not meta.get("qemu_defaults"):
                    meta["qemu_defaults"] = getattr(mig, "defaults", None)
                wait_login(lab, base["key"], ip)
                pg_init(lab, ip)
                row = {"case": case, "migrator": name, "runs": []}
                for i in range(a.runs):
                    tag = f"{case['id']}-{name}-{i}"
                    rec = measured_run(lab, mig, vm, 3 - vm.host, a, rundir, tag, base["key"])
                    rec.update(kind="pgbench", case=case, migrator=name, run=i)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    row["runs"].append(rec)
                    log(f"  run {i + 1}/{a.runs} {rec['from']}→{rec['to']}: " + summary(rec))
                    if not rec.get("converged"):
                        break
                rows.append(row)
            finally:
                mig.shutdown(vm)
    if any(a.links):
        lab.shape(0)
    return rows


# ---------------------------------------------------------------- the table

def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


COLUMNS = [
    # (heading, key or function of a record, format)
    ("end-to-end s", "e2e_s", "{:.1f}"),
    ("QEMU downtime ms", "qemu_downtime_ms", "{:.0f}"),
    ("pause STOP→RESUME ms", "pause_ms", "{:.0f}"),
    ("pgbench longest transaction ms (STOP−5 s … RESUME+5 s)", "pg_max_lat_ms", "{:.0f}"),
    ("pgbench TPS around the move", "pg_tps_around", "{:.1f}"),
    ("pgbench TPS in the 10 s before", "pg_tps_before", "{:.1f}"),
    ("TPS around ÷ before", "pg_tps_kept", "{:.2f}"),
    ("SSH echo gap ms (a line every 10 ms)", "ssh_gap_ms", "{:.0f}"),
]


def table(rows, meta):
    from harness import link_name, med
    pg = meta.get("pgbench") or {}
    out = [f"### bench/migrate --workload pgbench — median (min–max) over good runs; "
           f"{meta['runs']} run(s) per migrator, Debian 12 + PostgreSQL 15, "
           f"{meta['vcpus']} vCPU, {pg.get('memory_mib', MEMORY_MIB)} MiB, TCG", ""]
    p = (meta.get("qemu_defaults") or {}).get("parameters", {})
    if p:
        out += [f"QEMU {meta['qemu_version']} defaults used by the baseline: max-bandwidth "
                f"{p.get('max-bandwidth', 0) / (1 << 20):.0f} MiB/s, downtime-limit "
                f"{p.get('downtime-limit')} ms. Measured links: " + ", ".join(
                    f"{link_name(k)} {v:.0f} Mbit/s" for k, v in meta["links"].items()) + ".", ""]
    out += [f"Load: `pgbench -c {pg.get('clients', CLIENTS)} -j 1 -T {pg.get('seconds')}` at "
            f"scale {pg.get('scale', SCALE)} from the client namespace; the migrate command goes "
            f"{pg.get('lead_s', LEAD_S):.0f} s into it. 'Before' = the "
            f"{pg.get('before_s', BEFORE_S):.0f} s ending at the migrate command; 'around the "
            f"move' = from {pg.get('around_s', AROUND_S):.0f} s before the source's STOP to "
            f"{pg.get('around_s', AROUND_S):.0f} s after the destination's RESUME. SSH: an open "
            "session running `cat`, a numbered line sent every "
            f"{pg.get('ssh_interval_ms', SSH_INTERVAL_MS)} ms; the longest time between two "
            "echoes.", ""]
    heads = ["link", "migrator", "good runs"] + [c[0] for c in COLUMNS] + [
        "pgbench failed / aborted"]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + " --- |" * len(heads))
    by_link = {}
    for r in rows:
        good = [x for x in r["runs"] if not x["errors"]]
        failed = sum(x.get("pg_failed") or 0 for x in r["runs"])
        aborted = sum(1 for x in r["runs"] if x.get("pg_exit") != 0 or x.get("pg_aborted"))
        cells = [link_name(r["case"]["link_mbit"]), r["migrator"],
                 f"{len(good)}/{len(r['runs'])}"]
        cells += [med([x.get(k) for x in good], fmt) for _, k, fmt in COLUMNS]
        cells.append(f"{failed} / {aborted}")
        out.append("| " + " | ".join(cells) + " |")
        by_link.setdefault(r["case"]["link_mbit"], {})[r["migrator"]] = good
    for link, m in by_link.items():
        if "tern" not in m or "baseline" not in m:
            continue
        cells = [link_name(link), "**tern ÷ baseline**", ""]
        for _, k, _ in COLUMNS:
            t, b = median([x.get(k) for x in m["tern"]]), median([x.get(k) for x in m["baseline"]])
            cells.append(f"×{t / b:.2f}" if t is not None and b else "–")
        cells.append("")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Every run: end-to-end s / pause ms / longest transaction ms (its end, ms from "
            "STOP; the longest in the 10 s before) / TPS around ÷ before / SSH gap ms (its start, "
            "ms from STOP; the longest in the 10 s before)"]
    for r in rows:
        cells = []
        for x in r["runs"]:
            if x["errors"]:
                cells.append(f"run {x['run']} ERROR: " + "; ".join(x["errors"]))
                continue
            before = x.get("ssh_gap_before_ms")
            cells.append(
                f"{x['e2e_s']:.1f} / {fmt0(x.get('pause_ms'))} / {fmt0(x.get('pg_max_lat_ms'))} "
                f"({fmt0(x.get('pg_max_lat_end_ms'), '{:+.0f}')}; "
                f"{fmt0(x.get('pg_max_lat_before_ms'))}) / "
                f"{fmt0(x.get('pg_tps_kept'), '{:.2f}')} / {fmt0(x.get('ssh_gap_ms'))} "
                f"({fmt0(x.get('ssh_gap_start_ms'), '{:+.0f}')}; "
                f"{'≤30' if before is None else f'{before:.0f}'})")
        out.append(f"- {link_name(r['case']['link_mbit'])}, {r['migrator']}: " + ", ".join(cells))
    return "\n".join(out)


def fmt0(x, fmt="{:.0f}"):
    return "?" if x is None else fmt.format(x)


def render(recs, meta):
    """The table of a JSON-lines file written by an earlier `--workload pgbench` run."""
    pm = [r for r in recs if r["kind"] == "pgbench-meta"]
    meta["pgbench"] = {k: v for k, v in pm[0].items() if k != "kind"} if pm else {}
    rows = {}
    for r in recs:
        if r["kind"] == "pgbench":
            key = (r["case"]["id"], r["migrator"])
            rows.setdefault(key, {"case": r["case"], "migrator": r["migrator"],
                                  "runs": []})["runs"].append(r)
    return table(list(rows.values()), meta)
