#!/usr/bin/env python3
"""bench/migrate probes, each run inside a lab namespace with `ip netns exec NS python3 probe.py`.

  stream --addr IP:PORT [--ping-ms 10] [--ping-mode rpc|stream]
      reads a tern-guest serve stream (protocol: guest/README.md) until SIGTERM/SIGINT and
      sends `PING <n> <us>` lines: with `rpc` (default) one at a time, the next --ping-ms after
      the previous echo, as a request/response client would (a request lost in the switchover
      then waits for TCP's retransmit timer); with `stream` every --ping-ms regardless. Prints
      one JSON object: records, longest gap between records (with its monotonic start/end and
      how far the guest's clock moved across it), every gap above 30 ms, resets, missing,
      duplicates, corrupt, boot changes, and the echo round trips (client to guest and back).
  blast-recv --bind IP:PORT    accepts one TCP connection, counts bytes until EOF, prints JSON
  blast-send --addr IP:PORT --seconds S
  trace --ifnames A,B,... --mac MAC
      records every frame to or from MAC (and every RARP/ARP) crossing those interfaces until
      SIGTERM, with kernel timestamps; prints a JSON list of
      [t, ifname, dir, src_is_vm, dst_is_vm, kind, detail] (dir `out` = the bridge sent it
      out of this port, `in` = it came in).
  announce --ifname IF --mac MAC
      opens a raw socket on IF, prints `ready`, then for every line read on stdin (`go`, or
      `go PORT` to first point IF's bridge entry for MAC at PORT) sends one RARP frame with
      MAC as source (what QEMU's announce-self sends) and prints `sent <monotonic_s>`.
  ssh-echo --key FILE --dest USER@IP [--interval-ms 10]
      logs in with ssh and runs `cat` in the guest, prints `ready` once the session is open,
      then sends a numbered line every --interval-ms (a typist's keystrokes) and timestamps
      every echo on a reader thread until SIGTERM; then prints one JSON object: lines sent and
      echoed, the longest gap between echoes (with its monotonic start), every gap above
      30 ms, the longest round trip, lines never echoed, and whether the session is still
      open.

All times are CLOCK_MONOTONIC seconds, the same clock the harness and its QMP client use.
"""

import json
import os
import signal
import socket
import sys
import time

GAP_REPORT_MS = 30.0


def fnv1a32(data):
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def parse_record(line):
    """(seq, stream, guest_us) of a valid `R` line, or None when its layout or checksum is
    wrong."""
    f = line.split(" ")
    if len(f) != 5 or len(f[1]) != 16 or len(f[2]) != 16:
        return None
    try:
        if fnv1a32(line[:-9].encode()) != int(f[4], 16):
            return None
        return int(f[1], 16), int(f[3], 16), int(f[2], 16)
    except ValueError:
        return None


class Stop:
    flag = False


def on_signal(_sig, _frm):
    Stop.flag = True


def connect(addr, give_up_at=None):
    host, port = addr.rsplit(":", 1)
    while not Stop.flag:
        try:
            s = socket.create_connection((host, int(port)), timeout=2.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(0.005)
            return s
        except OSError:
            if give_up_at is not None and time.monotonic() > give_up_at:
                raise
            time.sleep(0.05)
    return None


def cmd_stream(addr, ping_ms, rpc):
    r = {"addr": addr, "records": 0, "resets": 0, "missing": 0, "duplicates": 0, "corrupt": 0,
         "boot_ids": [], "pings_sent": 0, "echoes": 0, "longest_gap_ms": 0.0,
         "longest_gap_start": None, "longest_gap_end": None, "longest_gap_guest_ms": None,
         "gaps": [],
         "longest_echo_rtt_ms": 0.0, "longest_echo_sent_at": None, "slow_echoes": []}
    s = connect(addr, give_up_at=time.monotonic() + 10.0)
    start = time.monotonic()
    r["start"] = start
    last_rec = None  # the connection's set-up is not a gap the migration caused
    last_seq = None
    last_guest_us = None
    stream = None
    sent = {}
    next_ping = start
    buf = b""

    def gap(a, b):
        ms = (b - a) * 1000.0
        if ms > GAP_REPORT_MS:
            r["gaps"].append([round(a, 6), round(b, 6)])
        if ms > r["longest_gap_ms"]:
            r["longest_gap_ms"], r["longest_gap_start"], r["longest_gap_end"] = ms, a, b

    while not Stop.flag and s is not None:
        now = time.monotonic()
        if now >= next_ping and not (rpc and sent):
            n = r["pings_sent"]
            try:
                s.sendall(f"PING {n} {int(now * 1e6)}\n".encode())
                sent[n] = now
                r["pings_sent"] += 1
            except socket.timeout:
                pass  # send buffer full while the guest is away: try at the next tick
            except OSError:
                pass
            next_ping += ping_ms / 1000.0
            if next_ping < now:
                next_ping = now + ping_ms / 1000.0
        try:
            data = s.recv(65536)
            if not data:
                raise ConnectionResetError("closed")
        except socket.timeout:
            continue
        except OSError:
            r["resets"] += 1
            s.close()
            s = connect(addr)
            last_seq, last_guest_us, stream, buf = None, None, None, b""
            r["pings_lost_on_reset"] = r.get("pings_lost_on_reset", 0) + len(sent)
            sent.clear()
            continue
        now = time.monotonic()
        buf += data
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("ascii", "replace").rstrip()
            if line.startswith("R "):
                rec = parse_record(line)
                if rec is None:
                    r["corrupt"] += 1
                    continue
                seq, st, guest_us = rec
                r["records"] += 1
                if last_rec is not None:
                    gap(last_rec, now)
                    if r["longest_gap_end"] == now and last_guest_us is not None:
                        # How far the guest's own clock moved across that gap: the part of
                        # the gap the guest was running (its clock stops while paused).
                        r["longest_gap_guest_ms"] = (guest_us - last_guest_us) / 1000.0
                last_rec = now
                last_guest_us = guest_us
                if stream is not None and st != stream:
                    r["corrupt"] += 1
                if last_seq is not None and seq <= last_seq:
                    r["duplicates"] += 1
                elif last_seq is not None:
                    r["missing"] += seq - last_seq - 1
                else:
                    r["missing"] += seq - 1
                last_seq = seq if last_seq is None else max(last_seq, seq)
            elif line.startswith("E PING "):
                try:
                    n = int(line.split(" ")[2])
                except (IndexError, ValueError):
                    continue
                t = sent.pop(n, None)
                if t is not None:
                    if rpc:
                        next_ping = now + ping_ms / 1000.0
                    r["echoes"] += 1
                    rtt = (now - t) * 1000.0
                    if rtt > GAP_REPORT_MS:
                        r["slow_echoes"].append([round(t, 6), round(rtt, 3)])
                    if rtt > r["longest_echo_rtt_ms"]:
                        r["longest_echo_rtt_ms"], r["longest_echo_sent_at"] = rtt, t
            elif line.startswith("H "):
                for f in line.split(" "):
                    if f.startswith("boot=") and f[5:] not in r["boot_ids"]:
                        r["boot_ids"].append(f[5:])
                    if f.startswith("stream="):
                        stream = int(f[7:], 16)
    end = time.monotonic()
    gap(last_rec if last_rec is not None else start, end)
    r["end"] = end
    r["unanswered_pings"] = len(sent)
    r["boot_changes"] = max(0, len(r["boot_ids"]) - 1)
    r["ok"] = (r["records"] > 0 and r["resets"] == r["missing"] == r["duplicates"] == r["corrupt"]
               == r["boot_changes"] == 0)
    if s is not None:
        try:
            s.settimeout(0.5)
            s.sendall(b"QUIT\n")
            s.close()
        except OSError:
            pass
    print(json.dumps(r))


def cmd_blast_recv(bind):
    host, port = bind.rsplit(":", 1)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(1)
    print("ready", flush=True)
    ls.settimeout(30.0)
    c, _ = ls.accept()
    buf = bytearray(1 << 20)
    total, t0 = 0, None
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        if t0 is None:
            t0 = time.monotonic()
        total += n
    t1 = time.monotonic()
    el = max(t1 - (t0 or t1), 1e-6)
    print(json.dumps({"bytes": total, "seconds": el, "mbit_s": total * 8 / el / 1e6}))


def cmd_blast_send(addr, seconds):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10.0)
    chunk = b"\0" * (1 << 20)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()


ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
PACKET_OUTGOING = 4


def describe(frame, vm_mac):
    """(src_is_vm, dst_is_vm, kind, detail) of a frame worth tracing, else None."""
    dst, src, etype = frame[0:6], frame[6:12], int.from_bytes(frame[12:14], "big")
    s_vm, d_vm = src == vm_mac, dst == vm_mac
    if etype == 0x8035:
        return s_vm, d_vm, "rarp", ""
    if etype == 0x0806:
        op = int.from_bytes(frame[20:22], "big")
        return s_vm, d_vm, "arp", f"op={op} sender={'.'.join(map(str, frame[28:32]))}"
    if not (s_vm or d_vm) or etype != 0x0800:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    proto = ip[9]
    body = ip[ihl:]
    if proto == 1:
        return s_vm, d_vm, "icmp", f"type={body[0]} seq={int.from_bytes(body[6:8], 'big')}"
    if proto == 6:
        sport, dport = int.from_bytes(body[0:2], "big"), int.from_bytes(body[2:4], "big")
        seq, ack = int.from_bytes(body[4:8], "big"), int.from_bytes(body[8:12], "big")
        off = (body[12] >> 4) * 4
        flags = body[13]
        plen = int.from_bytes(ip[2:4], "big") - ihl - off
        names = "".join(n for b, n in ((1, "F"), (2, "S"), (4, "R"), (8, "P"), (16, "A"))
                        if flags & b)
        return s_vm, d_vm, "tcp", f"{sport}>{dport} {names} seq={seq} ack={ack} len={plen}"
    return s_vm, d_vm, f"ip{proto}", ""


def cmd_trace(ifnames, mac):
    import select
    import struct
    vm_mac = bytes(int(x, 16) for x in mac.split(":"))
    wall_to_mono = time.time() - time.monotonic()
    socks = {}
    for name in ifnames.split(","):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((name, 0))
        s.setblocking(False)
        socks[s.fileno()] = (s, name)
    print("ready", flush=True)
    events = []
    while not Stop.flag:
        try:
            ready, _, _ = select.select(list(socks), [], [], 0.1)
        except InterruptedError:
            continue
        for fd in ready:
            s, name = socks[fd]
            while True:
                try:
                    data, anc, _, addr = s.recvmsg(256, 64)
                except (BlockingIOError, InterruptedError):
                    break
                t = time.time()
                for level, typ, val in anc:
                    if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", val[:16])
                        t = sec + nsec / 1e9
                d = describe(data, vm_mac) if len(data) >= 34 else None
                if d:
                    direction = "out" if addr[2] == PACKET_OUTGOING else "in"
                    events.append([round(t - wall_to_mono, 6), name, direction, *d])
    print(json.dumps(events))


def rarp_frame(mac):
    """The RARP `request reverse` frame QEMU's announce-self sends, with MAC as source."""
    m = bytes(int(x, 16) for x in mac.split(":"))
    eth = b"\xff" * 6 + m + b"\x80\x35"
    # htype 1, ptype IPv4, hlen 6, plen 4, op 3 (request reverse), sha/tha = MAC, IPs zero.
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x03" + m + b"\0" * 4 + m + b"\0" * 4
    return (eth + arp).ljust(60, b"\0")


def fdb_point(mac, port):
    """`bridge fdb replace MAC dev PORT master dynamic` over rtnetlink, in-process (a `bridge`
    subprocess costs milliseconds while the guest is paused)."""
    import struct
    ifindex = socket.if_nametoindex(port)
    lladdr = bytes(int(x, 16) for x in mac.split(":"))
    nda = struct.pack("HH", 4 + len(lladdr), 2) + lladdr  # NDA_LLADDR
    nda += b"\0" * (-len(nda) % 4)
    # ndmsg: AF_BRIDGE, ifindex, NUD_REACHABLE (a dynamic entry learning may move), NTF_MASTER
    ndm = struct.pack("BBHiHBB", 7, 0, 0, ifindex, 0x02, 0x04, 0)
    flags = 0x1 | 0x4 | 0x400 | 0x100  # REQUEST | ACK | CREATE | REPLACE
    body = ndm + nda
    msg = struct.pack("IHHII", 16 + len(body), 28, flags, 1, 0) + body  # RTM_NEWNEIGH
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:
        nl.send(msg)
        reply = nl.recv(4096)
    err = struct.unpack("i", reply[16:20])[0]
    if err != 0:
        raise OSError(-err, f"fdb replace {mac} dev {port}: {os.strerror(-err)}")


def cmd_announce(ifname, mac):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((ifname, 0))
    frame = rarp_frame(mac)
    print("ready", flush=True)
    for line in sys.stdin:
        # `go` sends the RARP; `go PORT` first points the bridge's entry for MAC at PORT.
        words = line.split()
        if len(words) > 1:
            fdb_point(mac, words[1])
        s.send(frame)
        print(f"sent {time.monotonic():.6f}", flush=True)


def ssh_echo_report(sent, echoes, alive):
    """The figures of one ssh-echo session: sent = {n: send time}, echoes = [(time, n)]."""
    r = {"sent": len(sent), "echoed": len(echoes), "alive": alive, "longest_gap_ms": 0.0,
         "longest_gap_start": None, "gaps": [], "longest_rtt_ms": 0.0, "longest_rtt_sent_at": None}
    for (a, _), (b, _) in zip(echoes, echoes[1:]):
        ms = (b - a) * 1000.0
        if ms > GAP_REPORT_MS:
            r["gaps"].append([round(a, 6), round(b, 6)])
        if ms > r["longest_gap_ms"]:
            r["longest_gap_ms"], r["longest_gap_start"] = ms, a
    for t, n in echoes:
        rtt = (t - sent[n]) * 1000.0 if n in sent else 0.0
        if rtt > r["longest_rtt_ms"]:
            r["longest_rtt_ms"], r["longest_rtt_sent_at"] = rtt, sent[n]
    got = {n for _, n in echoes}
    # Lines sent after the last echo may still be in flight at the stop: not lost.
    last = max(got) if got else -1
    r["lost"] = sum(1 for n in sent if n < last and n not in got)
    return r


def cmd_ssh_echo(key, dest, interval_ms):
    import subprocess
    import threading
    p = subprocess.Popen(["ssh", "-i", key, "-o", "BatchMode=yes", "-o",
                          "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", dest,
                          "echo session-open; exec cat"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    echoes, opened = [], threading.Event()

    def reader():
        # Raw reads, stamped as they arrive: lines held up together share one time.
        buf = b""
        while True:
            data = os.read(p.stdout.fileno(), 65536)
            if not data:
                return
            now = time.monotonic()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line == b"session-open":
                    opened.set()
                elif line.isdigit():
                    echoes.append((now, int(line)))

    threading.Thread(target=reader, daemon=True).start()
    if not opened.wait(30.0) or Stop.flag:
        p.kill()
        print(json.dumps({"error": "the SSH session did not open within 30 s",
                          "exit": p.wait()}), flush=True)
        return
    print("ready", flush=True)
    sent, n, tick = {}, 0, time.monotonic()
    while not Stop.flag and p.poll() is None:
        try:
            os.write(p.stdin.fileno(), f"{n}\n".encode())
            sent[n] = time.monotonic()
            n += 1
        except OSError:
            break
        # On a fixed schedule, so a late tick does not shift the following ones.
        tick += interval_ms / 1000.0
        time.sleep(max(0.0, tick - time.monotonic()))
    time.sleep(0.3)  # the echoes of the last lines sent
    alive = p.poll() is None
    p.kill()
    p.wait()
    print(json.dumps(ssh_echo_report(sent, list(echoes), alive)), flush=True)


def main():
    a = sys.argv[1:]
    opts = {a[i][2:]: a[i + 1] for i in range(1, len(a) - 1, 2) if a[i].startswith("--")}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not a:
        sys.exit(__doc__)
    if a[0] == "stream":
        cmd_stream(opts["addr"], float(opts.get("ping-ms", "10")),
                   opts.get("ping-mode", "rpc") == "rpc")
    elif a[0] == "blast-recv":
        cmd_blast_recv(opts["bind"])
    elif a[0] == "blast-send":
        cmd_blast_send(opts["addr"], float(opts["seconds"]))
    elif a[0] == "trace":
        cmd_trace(opts["ifnames"], opts["mac"])
    elif a[0] == "ssh-echo":
        cmd_ssh_echo(opts["key"], opts["dest"], float(opts.get("interval-ms", "10")))
    elif a[0] == "announce":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cmd_announce(opts["ifname"], opts["mac"])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
