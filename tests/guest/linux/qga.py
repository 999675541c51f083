#!/usr/bin/env python3
"""qga.py — a minimal QEMU guest agent client for the tests.

    qga.py [--timeout S] [--time] SOCKET COMMAND [ARGUMENTS-JSON]

Connects to the host side of the agent's virtio-serial port (QEMU's
-chardev socket,path=SOCKET,server=on), resynchronises the way the agent's
protocol asks (a 0xff byte to drop any half-read request, then guest-sync
with a fresh id, reading until the reply carrying that id: earlier replies
and the parse error the 0xff causes are skipped), then sends COMMAND and
prints its "return" value as JSON.  An "error" reply is printed to stderr
and exits 1; no reply within the timeout exits 2.  --time prints the
command's round trip to stderr as "COMMAND: N ms".

Examples:
    qga.py RUNDIR/qga.sock guest-fsfreeze-freeze
    qga.py RUNDIR/qga.sock guest-file-open '{"path":"/data/stop","mode":"w"}'
"""
import argparse
import json
import os
import socket
import sys
import time


class Timeout(Exception):
    pass


class Agent:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self.buf = b""

    def close(self):
        self.sock.close()

    def _send(self, obj, prefix=b""):
        self.sock.sendall(prefix + json.dumps(obj).encode() + b"\n")

    def _line(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise Timeout() from None
            if not chunk:
                raise EOFError("agent socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def _reply(self, deadline):
        while True:
            line = self._line(deadline).strip(b"\xff \r\t")
            if not line:
                continue
            try:
                return json.loads(line)
            except ValueError:
                continue

    def sync(self):
        """Resynchronise; retried, as the agent may not be listening yet."""
        deadline = time.monotonic() + self.timeout
        while True:
            sid = (os.getpid() << 12 ^ time.monotonic_ns()) & 0x7FFFFFFF
            self._send({"execute": "guest-sync", "arguments": {"id": sid}},
                       prefix=b"\xff")
            step = min(deadline, time.monotonic() + 2.0)
            try:
                while True:
                    r = self._reply(step)
                    if r.get("return") == sid:
                        return
            except Timeout:
                if time.monotonic() >= deadline:
                    raise

    def command(self, name, arguments=None):
        """Returns (reply, seconds) — reply is the whole JSON object."""
        msg = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        t0 = time.monotonic()
        self._send(msg)
        r = self._reply(time.monotonic() + self.timeout)
        return r, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description="QEMU guest agent client")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("socket")
    ap.add_argument("command")
    ap.add_argument("arguments", nargs="?")
    a = ap.parse_args()
    args = json.loads(a.arguments) if a.arguments else None
    try:
        ag = Agent(a.socket, a.timeout)
        ag.sync()
        r, dt = ag.command(a.command, args)
        ag.close()
    except (Timeout, socket.timeout):
        print("qga.py: %s: no reply within %g s" % (a.command, a.timeout),
              file=sys.stderr)
        return 2
    except (OSError, EOFError) as e:
        print("qga.py: %s: %s" % (a.socket, e), file=sys.stderr)
        return 2
    if a.time:
        print("%s: %.1f ms" % (a.command, dt * 1000), file=sys.stderr)
    if "error" in r:
        print("qga.py: %s: %s" % (a.command, json.dumps(r["error"])),
              file=sys.stderr)
        return 1
    print(json.dumps(r.get("return")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
