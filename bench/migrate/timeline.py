#!/usr/bin/env python3
"""Prints what happened around each switchover of a bench/migrate JSON-lines file, in ms from
the moment the source paused (QMP STOP): QEMU's steps, the client's stream and ping gaps, and
(with --frames, for runs recorded with the frame trace) every frame of the VM at the switch.

usage: timeline.py FILE [--variant V] [--run N] [--frames [FROM_MS TO_MS]]
"""

import json
import sys


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    path = args[0]
    variant = args[args.index("--variant") + 1] if "--variant" in args else None
    run = int(args[args.index("--run") + 1]) if "--run" in args else None
    frames = "--frames" in args
    window = (-50.0, 400.0)
    if frames and len(args) > args.index("--frames") + 2:
        try:
            i = args.index("--frames")
            window = (float(args[i + 1]), float(args[i + 2]))
        except ValueError:
            pass
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    for r in recs:
        if r.get("kind") not in ("run", "experiment") or not r.get("t_stop"):
            continue
        v = r.get("experiment_variant", r.get("variant"))
        if (variant and v != variant) or (run is not None and r.get("run") != run):
            continue
        t0 = r["t_stop"]

        def rel(t):
            return "–" if t is None else f"{(t - t0) * 1000:+.1f}"

        print(f"== {r['case']['label']} {v} run {r['run']} {r['from']}→{r['to']}: QEMU downtime "
              f"{r['qemu_downtime_ms']} ms")
        steps = [("migrate", r.get("t_cmd")), ("pre-switchover", r.get("t_pre_switchover")),
                 ("injected RARP", r.get("t_hook")), ("migrate-continue", r.get("t_continue")),
                 ("source saw completed", r.get("t_done")), ("destination RESUME",
                                                             r.get("t_resume"))]
        print("   " + ", ".join(f"{n} {rel(t)}" for n, t in steps if t is not None))
        gs = r.get("tcp_gap_start")
        print(f"   client TCP gap {rel(gs)} → {rel(gs + r['tcp_gap_ms'] / 1000)} "
              f"({r['tcp_gap_ms']:.0f} ms, guest clock moved {r.get('tcp_gap_guest_ms')} ms); "
              f"ping gap {rel(r['ping_gap_at'])} +{r['ping_gap_ms']:.0f} ms, lost "
              f"{r['ping_lost']}")
        slow = [(a, b) for a, b in r["stream"]["slow_echoes"] if abs(a - t0) < 2]
        if slow:
            print("   slow echoes (sent at → answered after ms): " + ", ".join(
                f"{rel(a)}→{b:.0f}" for a, b in slow))
        if frames and r.get("frames"):
            last = None
            for t, ifn, d, svm, dvm, kind, detail in r["frames"]:
                if not window[0] <= (t - t0) * 1000 <= window[1]:
                    continue
                who = "VM→" if svm else ("→VM" if dvm else "   ")
                line = f"{ifn} {d} {who} {kind} {detail.split(' seq=')[0]}"
                if line == last:
                    continue
                last = line
                print(f"     {rel(t):>9} {line}  {detail}")


if __name__ == "__main__":
    main()
