#!/usr/bin/env python3
"""bench/migrate: live migration between two lab hosts, measured from the outside.

QEMU's own figures, the guest's users' TCP stream, requests and pings, and the guest's memory
verifier, printed as a markdown table; raw records go to a JSON-lines file.

Cases: guest memory × dirty rate (over a 512 MiB working set) × migration link (unshaped, or
shaped with tc to 1 Gbit/s). Each case boots one guest on h1, then every run moves it to the
other host (h1→h2, h2→h1, ...), so runs alternate direction and the boot is paid once.

`--experiment` instead measures what clients see across the switchover with variants of the
baseline (EXP_VARIANTS): QEMU's default flow; pause-before-switchover continued at once
(control); and pause-before-switchover with the LAN taught the VM's new port while the source
is paused (a RARP from the destination bridge, with and without pointing that bridge's FDB
entry at the new tap; QMP announce-self on the destination), then `migrate-continue`.

`--workload pgbench` instead moves a Debian VM running PostgreSQL under pgbench's load, with an
SSH session typing into it (pgbench.py), and prints its own table.

Run as root from the repository: bench/migrate/run.sh [flags] (builds what it needs).
`harness.py --render FILE.jsonl` prints the table of an earlier run again.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab import CLEANUP, PROBE, ROOT, TERN_GUEST, BenchError, Lab, Proc, log  # noqa: E402
from migrators import Baseline, Tern, TernPlain  # noqa: E402
import pgbench  # noqa: E402

VM_IP = "10.78.0.100"
VM_MAC = "52:54:00:7e:00:01"
WORKING_SET_MIB = 512
TAIL_S = 3.0
PING_INTERVAL_S = 0.005
# The guest's users run at a higher priority than the QEMUs, as they would on other machines:
# on 2 cores a starved probe would see gaps the guest never had.
PROBE_NICE = -10

MIGRATORS = {"baseline": Baseline, "tern": Tern, "tern-plain": TernPlain}


# ---------------------------------------------------------------- per-run measurement

def parse_ping(path, wall_to_mono):
    """Reply times (monotonic s) and icmp_seqs from `ping -D` output; transmitted count."""
    replies, transmitted = [], None
    with open(path) as f:
        for line in f:
            if line.startswith("[") and "icmp_seq=" in line:
                ts = float(line[1:line.index("]")])
                seq = int(line.split("icmp_seq=")[1].split()[0])
                replies.append((ts - wall_to_mono, seq))
            elif "packets transmitted" in line:
                transmitted = int(line.split()[0])
    return replies, transmitted


def ping_summary(replies, transmitted):
    """Longest interval between consecutive replies, and requests never answered (among those
    sent before the last answered one: the last in flight at the stop is not lost)."""
    times = sorted(t for t, _ in replies)
    gap, at = 0.0, None
    for a, b in zip(times, times[1:]):
        if b - a > gap:
            gap, at = b - a, a
    seqs = {s for _, s in replies}
    lost = max(seqs) - len(seqs) if seqs else transmitted  # icmp_seq counts from 1
    return {"ping_gap_ms": gap * 1000, "ping_gap_at": at, "ping_replies": len(seqs),
            "ping_sent": transmitted, "ping_lost": lost}


class Probes:
    """The guest's users during one run: a serve-stream client, a request/response client
    (`tern-guest rr`, a request every ms) and a fast ping, all in the client namespace,
    started before the migration and stopped TAIL_S after it."""

    def __init__(self, lab, rundir, tag, trace=False):
        self.lab = lab
        self.ping_out = os.path.join(rundir, f"{tag}.ping")
        self.wall_to_mono = time.time() - time.monotonic()
        self.trace = None
        if trace:
            # Every frame of the VM's crossing the switch's ports, to see where frames went.
            self.trace = Proc(lab.fab, ["python3", PROBE, "trace", "--ifnames",
                                        "h1-sw,h2-sw", "--mac", VM_MAC],
                              name="trace", nice=PROBE_NICE)
            if self.trace.p.stdout.readline().strip() != "ready":
                raise BenchError("frame trace did not start")
        self.stream = Proc(lab.client, ["python3", PROBE, "stream", "--addr", f"{VM_IP}:7000",
                                        "--ping-ms", "10"], name="stream probe", nice=PROBE_NICE)
        self.ping = Proc(lab.client, ["ping", "-D", "-n", "-i", str(PING_INTERVAL_S), VM_IP],
                         stdout=self.ping_out, name="ping", nice=PROBE_NICE)
        # It reports when its stop file appears (a signal would end it without a report).
        self.rr_stop = os.path.join(rundir, f"{tag}.rr-stop")
        self.rr = Proc(lab.client, [TERN_GUEST, "rr", "--addr", f"{VM_IP}:7001",
                                    "--interval-ms", "1", "--duration-ms", "600000",
                                    "--stop-file", self.rr_stop],
                       name="request client", nice=PROBE_NICE)

    def wait_flowing(self, timeout_s=10.0):
        """Until ping has answers (the stream probe connects within that time too)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.ping_out) as f:
                if f.read().count("icmp_seq=") >= 20:
                    time.sleep(0.5)
                    return
            time.sleep(0.05)
        raise BenchError("no ping replies from the guest before migrating")

    def stop_rr(self):
        open(self.rr_stop, "w").close()
        try:
            out, _ = self.rr.p.communicate(timeout=15)
        finally:
            if self.rr.alive():
                self.rr.stop(signal.SIGKILL)
            CLEANUP.done(self.rr.token)
        for line in reversed((out or "").splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        raise BenchError(f"request client gave no report: {out!r}")

    def stop(self):
        rr = self.stop_rr()
        out = self.stream.stop(signal.SIGTERM, grace_s=10)
        self.ping.stop(signal.SIGINT)
        try:
            stream = json.loads(out)
        except (TypeError, ValueError):
            raise BenchError(f"stream probe gave no report: {out!r}")
        replies, sent = parse_ping(self.ping_out, self.wall_to_mono)
        trace = None
        if self.trace:
            trace = json.loads(self.trace.stop(signal.SIGTERM, grace_s=10))
        return stream, ping_summary(replies, sent), trace, rr


def analyze_frames(rec, frames):
    """What the switch ports saw around the switchover (times in ms from the source's STOP):
    client→VM frames sent to the old host after the pause (lost with the source), client→VM
    frames reaching the new host before the guest ran there (and how many of those pings were
    answered), and when the guest's own first frame left the new host."""
    t0, t_res = rec["t_stop"], rec["t_resume"]
    old, new = f"{rec['from']}-sw", f"{rec['to']}-sw"
    to_vm = [f for f in frames if f[4] and f[2] == "out"]
    lost_old = [f for f in to_vm if f[1] == old and f[0] > t0]
    early_new = [f for f in to_vm if f[1] == new and f[0] < t_res]
    replies = {f[6] for f in frames if f[3] and f[5] == "icmp" and f[6].startswith("type=0")}
    early_pings = [f for f in early_new if f[5] == "icmp"]
    answered = sum(1 for f in early_pings if f[6].replace("type=8", "type=0") in replies)
    from_vm = [f for f in frames if f[3] and f[1] == new and f[2] == "in" and f[0] >= t_res]
    guest = [f for f in from_vm if f[5] != "rarp"]  # QEMU's own RARPs are not the guest's
    learned = [f for f in frames if f[3] and f[1] == new and f[2] == "in" and f[0] >= t0 - 0.01]

    def ms(f):
        return (f[0] - t0) * 1000 if f else None

    return {"to_old_port_after_stop": len(lost_old), "to_new_port_before_resume": len(early_new),
            "early_pings": len(early_pings), "early_pings_answered": answered,
            "switch_learns_new_port_ms": ms(learned[0] if learned else None),
            "guest_first_frame_ms": ms(guest[0] if guest else None),
            "guest_first_frame_after_resume_ms": (guest[0][0] - t_res) * 1000 if guest else None}


def console_errors(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"TERN-GUEST-ERROR")
    except FileNotFoundError:
        return 0


def wait_verified(lab, timeout_s=60.0):
    """Waits until the guest's memory verifier finished one complete pass over every page
    after the move, then returns its stats (errors counted since boot)."""
    s0 = lab.guest_stats(VM_IP)
    if not s0.get("mem"):
        return s0
    p0 = s0["mem"]["passes"]
    deadline = time.monotonic() + timeout_s
    while True:
        s = lab.guest_stats(VM_IP)
        if s["mem"]["passes"] >= p0 + 2 or time.monotonic() > deadline:
            s["verified_full_pass"] = s["mem"]["passes"] >= p0 + 2
            return s
        time.sleep(0.5)


def measured_run(lab, mig, vm, dst, deadline_s, rundir, tag, variant="default", hook=None,
                 trace=False):
    """One migration with the users watching; returns the full record."""
    probes = Probes(lab, rundir, tag, trace)
    try:
        probes.wait_flowing()
        rec = mig.migrate(vm, dst, deadline_s, variant=variant, on_pre_switchover=hook)
        time.sleep(TAIL_S)
    finally:
        stream, ping, frames, rr = probes.stop()
        mig.finish(vm)
    rec.update(ping)
    if frames is not None and rec.get("t_stop"):
        # Keep the switchover: from just before the pause to a while after the resume.
        lo, hi = rec["t_stop"] - 0.3, rec["t_resume"] + 1.5
        rec["frames"] = [f for f in frames if lo <= f[0] <= hi]
        rec["switch"] = analyze_frames(rec, rec["frames"])
    rec["rr"] = rr
    rec["wall_to_mono"] = probes.wall_to_mono
    rec["rr_wait_ms"] = rr["longest_wait_ms"]
    rec["rr_resent"] = rr["retransmits"]
    rec["tcp_gap_ms"] = stream["longest_gap_ms"]
    rec["tcp_gap_start"] = stream["longest_gap_start"]
    rec["tcp_gap_guest_ms"] = stream["longest_gap_guest_ms"]
    rec["echo_stall_ms"] = stream["longest_echo_rtt_ms"]
    rec["echo_stall_sent_at"] = stream["longest_echo_sent_at"]
    rec["stream"] = {k: stream[k] for k in ("records", "resets", "missing", "duplicates",
                                            "corrupt", "boot_changes", "pings_sent", "echoes",
                                            "unanswered_pings", "ok", "gaps", "slow_echoes")}
    rec["stream_errors"] = sum(stream[k] for k in ("resets", "missing", "duplicates",
                                                   "corrupt", "boot_changes"))
    stats = wait_verified(lab)
    rec["guest_stats"] = stats
    rec["verifier_errors"] = (stats["mem"]["errors"] if stats.get("mem") else 0) \
        + console_errors(vm.console)
    rec["loadavg"] = os.getloadavg()
    return rec


def dirty_rate(lab, seconds=3.0):
    """The guest's achieved dirty rate (MiB/s), from its own counter."""
    a = lab.guest_stats(VM_IP)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = lab.guest_stats(VM_IP)
    if not a.get("mem"):
        return 0.0
    return (b["mem"]["bytes_dirtied"] - a["mem"]["bytes_dirtied"]) / (1 << 20) / (
        time.monotonic() - t0)


# ---------------------------------------------------------------- formatting

def med(xs, fmt="{:.0f}"):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(xs[0])}–{fmt.format(xs[-1])})"


def link_name(rate_mbit):
    return "unshaped" if not rate_mbit else f"{rate_mbit / 1000:g} Gbit/s"



def pause_of(rec):
    """The guest's pause: STOP to RESUME from QMP events for the baseline; for tern, what the
    center measured (pre-switchover seen to destination running), its own record."""
    if rec.get("pause_ms") is not None:
        return rec["pause_ms"]
    return (rec.get("tern_result") or {}).get("pause_ms")

def waits_around_pause(rec):
    """The request client's waits over 50 ms split at the switchover: the longest begun by
    RESUME and ended at or after STOP (the pause's, as the lab test takes it), when it ended
    after RESUME (ms), and the longest of the others (pre-copy, or the machine's load after).
    `None` where the run has no STOP/RESUME."""
    rr, stop, res = rec.get("rr") or {}, rec.get("t_stop"), rec.get("t_resume")
    if stop is None or res is None:
        return None
    offset = rec.get("wall_to_mono")
    if offset is None:
        # Records before the offset was kept: the longest wait's end is on both clocks.
        lw = rr.get("longest_wait_ms")
        same = [e for e, w in rr.get("stalls", []) if lw is not None and abs(w - lw) < 0.001]
        if not same or not rr.get("longest_wait_end_us"):
            return None
        offset = same[0] / 1e6 - rr["longest_wait_end_us"] / 1e6
    around, other = None, 0.0
    for end_wall_us, ms in rr.get("stalls", []):
        end = end_wall_us / 1e6 - offset
        if end - ms / 1000 <= res + 0.001 and end >= stop:
            if around is None or ms > around[0]:
                around = (ms, (end - res) * 1000)
        else:
            other = max(other, ms)
    return {"pause_wait_ms": around[0] if around else None,
            "ends_after_resume_ms": around[1] if around else None,
            "other_longest_ms": other}


def waits_table(rows):
    """Where each case's request waits were: at the switchover, and elsewhere."""
    out = ["Where the request client waited (waits over 50 ms; median (min–max)): the longest "
           "wait begun by RESUME and ended after STOP, how long after RESUME it ended, and the "
           "longest wait elsewhere in the run (pre-copy, or after the switchover).", "",
           "| memory | dirty MiB/s | link | migrator | wait at the switchover ms "
           "| it ended after RESUME ms | longest wait elsewhere ms |",
           "|" + " --- |" * 7]
    for r in rows:
        c = r["case"]
        w = [x for x in (waits_around_pause(x) for x in r["runs"] if x["converged"]) if x]
        if not w:
            continue
        out.append(
            f"| {c['memory_mib'] // 1024} GiB | {c['dirty_mib_s'] or 'idle'} "
            f"| {link_name(c['link_mbit'])} | {r['migrator']} "
            f"| {med([x['pause_wait_ms'] for x in w])} "
            f"| {med([x['ends_after_resume_ms'] for x in w])} "
            f"| {med([x['other_longest_ms'] for x in w])} |")
    return out if len(out) > 4 else []


def case_table(rows, meta):
    out = [f"### bench/migrate — median (min–max) over converged runs; "
           f"{meta['runs']} run(s) per case, {meta['vcpus']} vCPU, TCG, "
           f"working set {WORKING_SET_MIB} MiB", ""]
    # A run without the baseline migrator records no QEMU defaults (None).
    p = (meta.get("qemu_defaults") or {}).get("parameters", {})
    if p:
        out.append(f"QEMU {meta['qemu_version']} defaults used by the baseline: max-bandwidth "
                   f"{p.get('max-bandwidth', 0) / (1 << 20):.0f} MiB/s, downtime-limit "
                   f"{p.get('downtime-limit')} ms, multifd off, announce "
                   f"{p.get('announce-rounds')} rounds from {p.get('announce-initial')} ms. "
                   f"Measured links: " + ", ".join(
                       f"{link_name(k)} {v:.0f} Mbit/s" for k, v in meta["links"].items()) + ".")
        out.append("")
    out.append("| memory | dirty MiB/s (set / got) | link | migrator | converged | end-to-end s "
               "| QEMU total s | QEMU downtime ms | pause STOP→RESUME ms | client TCP gap ms "
               "| client request stall ms | request wait ms (1 per ms) | segments resent "
               "| ping gap ms | pings lost | on the wire MiB | passes "
               "| RAM ÷ link s | stream errors | verifier errors |")
    out.append("|" + " --- |" * 20)
    for r in rows:
        c, runs = r["case"], r["runs"]
        ok = [x for x in runs if x["converged"]]
        got = med(c.get("dirty_got") and [c["dirty_got"]] or [])
        out.append(
            f"| {c['memory_mib'] // 1024} GiB | {c['dirty_mib_s'] or 'idle'} / {got} "
            f"| {link_name(c['link_mbit'])} | {r['migrator']} | {len(ok)}/{len(runs)} "
            f"| {med([x.get('e2e_s') for x in ok], '{:.1f}')} "
            f"| {med([(x.get('qemu_total_ms') or 0) / 1000 for x in ok], '{:.1f}')} "
            f"| {med([x.get('qemu_downtime_ms') for x in ok])} "
            f"| {med([pause_of(x) for x in ok])} "
            f"| {med([x.get('tcp_gap_ms') for x in ok])} "
            f"| {med([x.get('echo_stall_ms') for x in ok])} "
            f"| {med([x.get('rr_wait_ms') for x in ok])} "
            f"| {med([x.get('rr_resent') for x in ok])} "
            f"| {med([x.get('ping_gap_ms') for x in ok])} "
            f"| {med([x.get('ping_lost') for x in ok])} "
            f"| {med([(x.get('wire_bytes') or 0) / (1 << 20) for x in runs])} "
            f"| {med([x.get('passes') for x in runs])} "
            f"| {c['memory_mib'] * 8 * 1.048576 / c['link_measured_mbit']:.1f} "
            f"| {sum(x['stream_errors'] for x in runs)} "
            f"| {sum(x['verifier_errors'] for x in runs)} |")
    waits = waits_table(rows)
    if waits:
        out.append("")
        out.extend(waits)
    cost = encryption_cost(rows)
    if cost:
        out.append("")
        out.extend(cost)
    notes = [r for r in rows if any(not x["converged"] for x in r["runs"])]
    if notes:
        out.append("")
        for r in notes:
            errs = sorted({x["error"] for x in r["runs"] if x["error"]})
            last = [x for x in r["runs"] if not x["converged"]][-1]
            if last.get("remaining_bytes") is not None:
                errs.append(f"at the cancel {last['remaining_bytes'] / (1 << 20):.0f} MiB were "
                            f"dirty and QEMU expected {last.get('expected_downtime_ms')} ms of "
                            f"downtime")
            out.append(f"- {r['case']['label']}: " + "; ".join(errs) +
                       (" (further runs skipped: --repeat-unconverged to run them)"
                        if len(r["runs"]) < r["planned"] else ""))
    return "\n".join(out)


def encryption_cost(rows):
    """One line per case run by both `tern` (encrypted) and `tern-plain`: the ratios of
    encrypted to plain, end to end and in the client's longest TCP gap."""
    def medians(r, key):
        xs = sorted(x[key] for x in r["runs"] if x["converged"] and x.get(key) is not None)
        return xs[len(xs) // 2] if xs else None

    by = {}
    for r in rows:
        by.setdefault(r["case"]["label"], {})[r["migrator"]] = r
    out = []
    for label, m in by.items():
        enc, plain = m.get("tern"), m.get("tern-plain")
        if not enc or not plain:
            continue
        if not all(x.get("encrypted") for x in enc["runs"] if x["converged"]):
            out.append(f"- {label}: the `tern` runs were not all encrypted; no encryption ratio")
            continue
        e, p = medians(enc, "e2e_s"), medians(plain, "e2e_s")
        ge, gp = medians(enc, "tcp_gap_ms"), medians(plain, "tcp_gap_ms")
        if e and p:
            gap = f"{ge:.0f} ms vs {gp:.0f} ms" if ge is not None and gp is not None else "?"
            out.append(f"- {label}: encryption costs end to end ×{e / p:.2f} ({e:.1f} s vs "
                       f"{p:.1f} s in clear); client TCP gap {gap}")
    return out


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="1 run, 1 GiB, idle and 256 MiB/s, unshaped link")
    ap.add_argument("--big", action="store_true", help="add 4 GiB guests")
    ap.add_argument("--memory-gib", type=int, nargs="+", default=[1])
    ap.add_argument("--dirty", type=int, nargs="+", default=[0, 64, 256, 1024],
                    help="dirty rates in MiB/s over the working set (0 = idle)")
    ap.add_argument("--links", type=int, nargs="+", default=None,
                    help="migration link rates in Mbit/s (0 = unshaped; default 0 1000, "
                    "with --workload pgbench 0)")
    ap.add_argument("--deadline-s-per-gib", type=float, default=120.0,
                    help="cancel a migration not done after this many seconds per GiB")
    ap.add_argument("--repeat-unconverged", action="store_true",
                    help="keep running a case after a run did not converge (default: skip)")
    ap.add_argument("--migrators", nargs="+", default=["baseline", "tern"], choices=sorted(MIGRATORS))
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--workload", choices=["cases", "pgbench"], default="cases",
                    help="cases: the test guest's dirty-rate cases; pgbench: Debian + "
                    "PostgreSQL under pgbench with an SSH session (see pgbench.py)")
    ap.add_argument("--pg-seconds", type=int, default=40,
                    help="pgbench: length of each run's load (the move starts 12 s in)")
    ap.add_argument("--experiment", action="store_true",
                    help="run the switchover-announce experiment instead of the cases")
    ap.add_argument("--exp-runs", type=int, default=6, help="runs per experiment variant")
    ap.add_argument("--exp-dirty", type=int, default=64, help="experiment's dirty rate")
    ap.add_argument("--exp-link", type=int, default=0,
                    help="experiment's migration link in Mbit/s (0 = unshaped)")
    ap.add_argument("--variants", nargs="+", default=[v for v, _ in EXP_VARIANTS],
                    choices=[v for v, _ in EXP_VARIANTS], help="experiment variants to run")
    ap.add_argument("--no-trace", dest="trace", action="store_false",
                    help="experiment: do not record the VM's frames at the switch ports")
    ap.add_argument("--out", default=None, help="JSON lines file (default bench/migrate/out/)")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the QEMU logs, consoles and ping outputs (kept anyway on errors)")
    ap.add_argument("--prefix", default="tmb")
    ap.add_argument("--lab-dir", default="/var/tmp/tern-bench-migrate")
    a = ap.parse_args()
    if a.links is None:
        a.links = [0] if a.workload == "pgbench" else [0, 1000]
    if a.quick:
        a.runs, a.memory_gib, a.dirty, a.links = 1, [1], [0, 256], [0]
    if a.big and 4 not in a.memory_gib:
        a.memory_gib.append(4)
    if a.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kind = "experiment" if a.experiment else a.workload
        a.out = os.path.join(ROOT, "bench", "migrate", "out", f"{kind}-{stamp}.jsonl")
    return a


def qemu_version():
    import subprocess
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return out.stdout.split("version ")[1].split()[0] if "version " in out.stdout else "?"


def make_case(mem_gib, dirty, link_mbit, link_measured):
    return {"id": f"{mem_gib}g-{dirty}-{link_mbit}", "memory_mib": mem_gib * 1024,
            "working_set_mib": WORKING_SET_MIB, "dirty_mib_s": dirty, "link_mbit": link_mbit,
            "link_measured_mbit": link_measured,
            "label": f"{mem_gib} GiB, {dirty or 'idle'} MiB/s, {link_name(link_mbit)}"}


def run_cases(a, lab, rundir, out, meta):
    rows = []
    for link in a.links:
        lab.shape(link)
        bw, detail = lab.measure_link()
        meta["links"][link] = bw
        out.write(json.dumps({"kind": "link", "link_mbit": link, **detail}) + "\n")
        for mem in a.memory_gib:
            for dirty in a.dirty:
                for name in a.migrators:
                    mig = MIGRATORS[name](lab, rundir, a.vcpus)
                    case = make_case(mem, dirty, link, bw)
                    log(f"case {case['label']}, {name}: booting")
                    vm = mig.boot(case, VM_IP, VM_MAC)
                    try:
                        if not meta.get("qemu_defaults"):
                            meta["qemu_defaults"] = getattr(mig, "defaults", None)
                        case["dirty_got"] = dirty_rate(lab) if dirty else None
                        row = {"case": case, "migrator": name, "runs": [], "planned": a.runs}
                        for i in range(a.runs):
                            dst = 3 - vm.host
                            tag = f"{case['id']}-{name}-{i}"
                            rec = measured_run(lab, mig, vm, dst, a.deadline_s_per_gib * mem,
                                               rundir, tag)
                            rec.update(kind="run", case=case, migrator=name, run=i)
                            out.write(json.dumps(rec) + "\n")
                            out.flush()
                            row["runs"].append(rec)
                            log(f"  run {i + 1}/{a.runs} {rec['from']}→{rec['to']}: "
                                + summary(rec))
                            if not rec["converged"] and not a.repeat_unconverged:
                                break
                        rows.append(row)
                    finally:
                        mig.shutdown(vm)
    if any(a.links):
        lab.shape(0)
    return rows


def summary(rec):
    def v(key, unit="ms"):
        x = rec.get(key)
        return "?" if x is None else f"{x:.0f}{unit}"

    if not rec["converged"]:
        return f"NOT converged ({rec['error']}), wire {(rec.get('wire_bytes') or 0) >> 20} MiB"
    return (f"e2e {rec['e2e_s']:.1f}s downtime {v('qemu_downtime_ms')} pause {v('pause_ms')} "
            f"tcp gap {v('tcp_gap_ms')} request stall {v('echo_stall_ms')} ping gap "
            f"{v('ping_gap_ms')} lost {rec['ping_lost']} stream errs {rec['stream_errors']} "
            f"verifier errs {rec['verifier_errors']}")


# ---------------------------------------------------------------- the experiment

EXP_VARIANTS = [
    ("default", "QEMU's default flow: the destination announces once it runs"),
    ("pbs", "pause-before-switchover, continued at once (control)"),
    ("pbs+rarp", "pbs + one RARP sent from the destination host's br0"),
    ("pbs+fdb+rarp", "pbs + the destination bridge's entry for the MAC pointed at the new tap "
     "(rtnetlink, like `bridge fdb replace ... dynamic`) + one RARP from its br0"),
    ("pbs+qmp-announce", "pbs + QMP `announce-self` on the (not yet running) destination QEMU"),
]
class Announcer:
    """A raw-socket sender kept ready on each host's br0, so the injection costs microseconds
    rather than a Python start-up while the guest is paused."""

    def __init__(self, lab):
        self.procs = {}
        for host in (1, 2):
            p = Proc(lab.h[host], ["python3", PROBE, "announce", "--ifname", "br0",
                                   "--mac", VM_MAC], stdin=True, name=f"announce h{host}")
            if p.p.stdout.readline().strip() != "ready":
                raise BenchError(f"announcer on h{host} did not start")
            self.procs[host] = p

    def send(self, host, fdb_port=None):
        p = self.procs[host]
        p.p.stdin.write(f"go {fdb_port}\n" if fdb_port else "go\n")
        p.p.stdin.flush()
        line = p.p.stdout.readline().split()
        if not line or line[0] != "sent":
            raise BenchError(f"announcer on h{host} failed: {line}")
        return float(line[1])

    def hook(self, variant, lab):
        """What runs while the source is paused at pre-switchover, for one variant."""
        if variant == "pbs+rarp":
            return lambda dst, dq: self.send(dst)
        if variant == "pbs+fdb+rarp":
            # The destination bridge still maps the VM's MAC to its uplink (learned from the
            # VM's broadcasts while it ran on the source), and a frame sent from br0 itself
            # teaches it nothing: point it at the new tap first.
            return lambda dst, dq: self.send(dst, fdb_port="vmtap0")
        if variant == "pbs+qmp-announce":
            def qmp_announce(dst, dq):
                dq.cmd("announce-self", initial=50, max=550, rounds=1, step=100)
                return time.monotonic()
            return qmp_announce
        return None

    def stop(self):
        for p in self.procs.values():
            p.stop()


def run_experiment(a, lab, rundir, out, meta):
    if a.exp_link:
        lab.shape(a.exp_link)
    bw, detail = lab.measure_link()
    meta["links"][a.exp_link] = bw
    out.write(json.dumps({"kind": "link", "link_mbit": a.exp_link, **detail}) + "\n")
    mig = Baseline(lab, rundir, a.vcpus)
    case = make_case(1, a.exp_dirty, a.exp_link, bw)
    log(f"experiment on {case['label']}: booting")
    vm = mig.boot(case, VM_IP, VM_MAC)
    meta["qemu_defaults"] = mig.defaults
    ann = Announcer(lab)
    results = {v: [] for v in a.variants}
    try:
        case["dirty_got"] = dirty_rate(lab) if a.exp_dirty else None
        for i in range(a.exp_runs):
            for variant in a.variants:
                dst = 3 - vm.host
                hook = ann.hook(variant, lab)
                rec = measured_run(lab, mig, vm, dst, a.deadline_s_per_gib, rundir,
                                   f"exp-{variant}-{i}",
                                   variant="default" if variant == "default" else "pbs",
                                   hook=hook, trace=a.trace)
                rec.update(kind="experiment", case=case, migrator="baseline",
                           experiment_variant=variant, run=i)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                results[variant].append(rec)
                log(f"  {variant} run {i + 1}/{a.exp_runs} {rec['from']}→{rec['to']}: "
                    + summary(rec))
    finally:
        ann.stop()
        mig.shutdown(vm)
    return case, results


def experiment_table(case, results, meta):
    p = meta["qemu_defaults"]["parameters"]
    out = [f"### bench/migrate --experiment — {case['label']} (dirty got "
           f"{case.get('dirty_got') or 0:.0f} MiB/s), median (min–max)", "",
           f"QEMU announce parameters: initial {p.get('announce-initial')} ms, max "
           f"{p.get('announce-max')} ms, rounds {p.get('announce-rounds')}, step "
           f"{p.get('announce-step')} ms; downtime-limit {p.get('downtime-limit')} ms. "
           "Times in ms; 'switch' columns from the frames seen at the switch ports.", "",
           "| variant | runs | QEMU downtime | pause STOP→RESUME | client TCP gap "
           "| TCP gap ÷ downtime | client request stall (RPC) | request stall ÷ downtime | ping gap "
           "| pings lost | switch learns new port (from STOP) | frames to old port after STOP "
           "| frames to new port before RESUME | of those pings answered "
           "| guest's first frame after RESUME | stream errors | verifier errors |",
           "|" + " --- |" * 17]
    for variant, desc in EXP_VARIANTS:
        if variant not in results:
            continue
        rs = [r for r in results[variant] if r["converged"]]
        sw = [r.get("switch", {}) for r in rs]
        ratio = [r["tcp_gap_ms"] / r["qemu_downtime_ms"] for r in rs if r["qemu_downtime_ms"]]
        eratio = [r["echo_stall_ms"] / r["qemu_downtime_ms"] for r in rs
                  if r["qemu_downtime_ms"]]
        out.append(
            f"| {variant}: {desc} | {len(rs)}/{len(results[variant])} "
            f"| {med([r['qemu_downtime_ms'] for r in rs])} "
            f"| {med([r['pause_ms'] for r in rs])} | {med([r['tcp_gap_ms'] for r in rs])} "
            f"| {med(ratio, '{:.1f}')} | {med([r['echo_stall_ms'] for r in rs])} "
            f"| {med(eratio, '{:.1f}')} | {med([r['ping_gap_ms'] for r in rs])} "
            f"| {med([r['ping_lost'] for r in rs])} "
            f"| {med([x.get('switch_learns_new_port_ms') for x in sw])} "
            f"| {med([x.get('to_old_port_after_stop') for x in sw])} "
            f"| {med([x.get('to_new_port_before_resume') for x in sw])} "
            f"| {sum(x.get('early_pings_answered', 0) for x in sw)}/"
            f"{sum(x.get('early_pings', 0) for x in sw)} "
            f"| {med([x.get('guest_first_frame_after_resume_ms') for x in sw])} "
            f"| {sum(r['stream_errors'] for r in results[variant])} "
            f"| {sum(r['verifier_errors'] for r in results[variant])} |")
    out += ["", "Every run (ms): QEMU downtime / pause / client TCP gap / echo stall / ping gap "
            "/ pings lost"]
    for variant, _ in EXP_VARIANTS:
        cells = [f"{r['qemu_downtime_ms']}/{r['pause_ms']:.0f}/{r['tcp_gap_ms']:.0f}/"
                 f"{r['echo_stall_ms']:.0f}/{r['ping_gap_ms']:.0f}/{r['ping_lost']}"
                 for r in results.get(variant, []) if r["converged"]]
        if cells:
            out.append(f"- {variant}: " + ", ".join(cells))
    return "\n".join(out)


def render(path):
    """Prints the table of a JSON-lines file written by an earlier run."""
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    meta = next(r for r in recs if r["kind"] == "meta")
    meta["links"] = {r["link_mbit"]: min(r["h1_h2_mbit_s"], r["h2_h1_mbit_s"])
                     for r in recs if r["kind"] == "link"}
    defaults = [r for r in recs if r["kind"] == "defaults"]
    meta["qemu_defaults"] = defaults[0] if defaults else {}
    if meta.get("workload") == "pgbench":
        return pgbench.render(recs, meta)
    exp = [r for r in recs if r["kind"] == "experiment"]
    if exp:
        results = {}
        for r in exp:
            results.setdefault(r["experiment_variant"], []).append(r)
        return experiment_table(exp[0]["case"], results, meta)
    rows = {}
    for r in recs:
        if r["kind"] == "run":
            key = (r["case"]["id"], r["migrator"])
            rows.setdefault(key, {"case": r["case"], "migrator": r["migrator"], "runs": [],
                                  "planned": meta["runs"]})["runs"].append(r)
    return case_table(list(rows.values()), meta)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(sys.argv[2]))
        return
    a = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/migrate: run as root (namespaces, taps, tc)")

    def on_term(_sig, _frm):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="tern-bench-migrate-")
    lab = Lab(a.prefix, a.lab_dir)
    meta = {"runs": a.runs, "vcpus": a.vcpus, "qemu_version": qemu_version(), "links": {},
            "workload": "experiment" if a.experiment else a.workload}
    status = 0
    try:
        with open(a.out, "w") as out:
            out.write(json.dumps({"kind": "meta", "argv": sys.argv[1:], **meta}) + "\n")
            for m in a.migrators:
                if hasattr(MIGRATORS[m], "check"):
                    MIGRATORS[m].check()
            full = any(getattr(MIGRATORS[m], "needs_full_lab", False) for m in a.migrators)
            lab.up(network_only=not (full and not a.experiment))
            if a.experiment:
                case, results = run_experiment(a, lab, rundir, out, meta)
                table = experiment_table(case, results, meta)
            elif a.workload == "pgbench":
                rows = pgbench.run(a, lab, rundir, out, meta, MIGRATORS, VM_IP, VM_MAC)
                table = pgbench.table(rows, meta)
            else:
                rows = run_cases(a, lab, rundir, out, meta)
                table = case_table(rows, meta)
            out.write(json.dumps({"kind": "defaults", **(meta.get("qemu_defaults") or {})})
                      + "\n")
        print("\n" + table + "\n")
        print(f"raw records: {a.out}")
        if a.keep_logs:
            print(f"QEMU logs and consoles: {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        status = 130
    except BenchError as e:
        log(f"error: {e}\nQEMU logs and consoles: {rundir}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        CLEANUP.run_all()
    sys.exit(status)


if __name__ == "__main__":
    main()
