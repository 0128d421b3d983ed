"""A tiny QMP client over a unix socket: commands, and every event kept with the monotonic time
it arrived, so the harness can line events up with its probes (same CLOCK_MONOTONIC)."""

import json
import socket
import threading
import time


class QmpError(Exception):
    pass


class Qmp:
    """One QMP connection. A reader thread splits replies from events; `cmd` waits for its reply.

    Events are kept as (monotonic_s, event_dict) in `events`, in arrival order.
    """

    def __init__(self, path, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not accept within {timeout_s}s")
                time.sleep(0.02)
        self.path = path
        self.events = []
        self._replies = []
        self._cv = threading.Condition()
        self._closed = False
        self._lock = threading.Lock()  # one command in flight at a time
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self._wait_reply(timeout_s)  # the greeting
        self.cmd("qmp_capabilities")

    def _read_loop(self):
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    now = time.monotonic()
                    msg = json.loads(line)
                    with self._cv:
                        if "event" in msg:
                            self.events.append((now, msg))
                        else:
                            self._replies.append(msg)
                        self._cv.notify_all()
        except OSError:
            pass
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _wait_reply(self, timeout_s):
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while not self._replies:
                left = deadline - time.monotonic()
                if self._closed:
                    raise QmpError(f"QMP connection {self.path} closed")
                if left <= 0:
                    raise QmpError(f"no QMP reply on {self.path} within {timeout_s}s")
                self._cv.wait(left)
            return self._replies.pop(0)

    def cmd(self, name, timeout_s=30.0, **args):
        """Runs one command and returns its `return` value; raises QmpError on `error`."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        with self._lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            reply = self._wait_reply(timeout_s)
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_event(self, pred, timeout_s, since_index=0):
        """Waits for an event (at index >= since_index) matching pred(event); returns
        (monotonic_s, event) or None at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            i = since_index
            while True:
                while i < len(self.events):
                    t, ev = self.events[i]
                    if pred(ev):
                        return t, ev
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cv.wait(left)

    def first_event(self, name, since_s=0.0):
        """The first event called `name` that arrived at or after monotonic `since_s`."""
        with self._cv:
            for t, ev in self.events:
                if t >= since_s and ev.get("event") == name:
                    return t, ev
        return None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
