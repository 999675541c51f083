#!/usr/bin/python3
"""plugin-crash.py: the data plane under concurrency and crashes.

Drives nbdkit-vmreplica-plugin the way a guest and vmreplicad do at once,
and kills it at random moments, for ROUNDS rounds:

- a libnbd client keeps QD writes, write-zeroes and trims (some FUA, some
  flushes) in flight over a small hot region of the disk, so blocks of
  sealed, unshipped cycles are rewritten all the time and must be
  preserved;
- a "shipper" thread SEALs every few milliseconds and ships the sealed
  cycles LAG cycles late, the way the daemon does: it rebuilds each cycle
  from its segment, preserve file and the live disk (tests/tools/cycapply)
  into a replica image, checks the replica's SHA-256 against the one the
  plugin logged for the primary disk at that seal (hashlog=), says
  SHIPPED N and retires the segment (as the spare, or deleted) and the
  preserve file;
- each round ends with SIGKILL of nbdkit at a random moment, or earlier
  at a named fault point (VMREPLICA_FAULT, see lib/vr.h) inside the write
  path (between reservation, preserve, record and disk I/O) or the seal;
  then nbdkit restarts on the same files, the recovered open cycle is
  sealed and every cycle not yet applied is applied.

After every round it checks:
  1. every request the client saw complete has its record in the log
     (same kind, offset and length; a multiset over all cycles so far);
  2. each cycle rebuilt on the replica equals the primary disk at that
     cycle's seal (hashlog), and after the restart the replica equals the
     primary disk byte for byte: the disk is exactly the replay of its log;
  3. no request failed while nbdkit was alive (replication must not fail
     guest I/O).

Exit status 0 if no violation, 1 otherwise (the first violation is
printed with the round, the seed and the fault point).
"""
import argparse
import collections
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import nbd

REC_HDR = 32
SEG_HDR = 64
REC_MAGIC = 0x31525256
CL_WRITE, CL_ZERO, CL_TRIM, CL_SEAL, CL_WREF = 1, 2, 3, 4, 5
KEY = {CL_WRITE: "w", CL_WREF: "w", CL_ZERO: "z", CL_TRIM: "t"}
FAULTS = ["track-reserved", "track-preserved", "track-logged",
          "track-written", "track-settled", "seal-begin", "seal-disk", "seal-commit"]


class Violation(Exception):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def seg_name(cycle, sealed):
    return "%020d.%s" % (cycle, "log" if sealed else "open")


def read_records(path):
    """(kind, offset, len) of each record of a sealed segment, up to its
    seal; raises Violation on a malformed one (cycapply checks CRCs)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = SEG_HDR
    while pos + REC_HDR <= len(data):
        magic, kind, _flags, _disk, ln, _crc, off, _seq = struct.unpack_from(
            "<IBBHIIQQ", data, pos)
        if magic != REC_MAGIC:
            raise Violation("%s: bad record magic at %d" % (path, pos))
        if kind == CL_SEAL:
            return out
        out.append((kind, off, ln))
        pos += REC_HDR + (ln if kind == CL_WRITE else 0)
    raise Violation("%s: no seal record" % path)


class Plugin:
    """One nbdkit process serving the disk, and its control socket."""

    def __init__(self, args, d, extra=()):
        self.args, self.d = args, d
        self.extra = list(extra)  # more plugin parameters
        self.proc = None

    def start(self, fault=None):
        env = dict(os.environ)
        env.pop("VMREPLICA_FAULT", None)
        if fault:
            env["VMREPLICA_FAULT"] = fault
        for p in (self.d.sock, self.d.ctl):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        log = open(self.d.nbdkit_log, "ab")
        self.proc = subprocess.Popen(
            ["nbdkit", "--foreground", "--unix", self.d.sock, "--threads",
             str(self.args.threads), self.args.plugin,
             "disk=disk0:" + self.d.disk, "control=" + self.d.ctl,
             "hashlog=" + self.d.hashlog] + self.extra,
            stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise Violation("nbdkit exited at start (status %s); see %s"
                                % (self.proc.returncode, self.d.nbdkit_log))
            if os.path.exists(self.d.sock) and os.path.exists(self.d.ctl):
                return
            if time.monotonic() > deadline:
                raise Violation("nbdkit did not start in 20 s")
            time.sleep(0.002)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc:
            self.proc.wait()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, line):
        """One control request; None if nbdkit is gone."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(self.d.ctl)
                s.sendall(line.encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    b = s.recv(512)
                    if not b:
                        return None
                    buf += b
                return buf.decode().strip()
        except OSError:
            return None


def nbd_connect(sock, plugin, wait_s=5):
    """A libnbd handle connected to nbdkit's socket, or None if nbdkit
    died first.  nbdkit binds its socket before it listens: a connection
    in between is refused, so refusals are retried while it lives."""
    deadline = time.monotonic() + wait_s
    while True:
        h = nbd.NBD()
        h.set_export_name("disk0")
        try:
            h.connect_unix(sock)
            return h
        except nbd.Error as e:
            if not plugin.alive():
                return None
            if time.monotonic() > deadline:
                raise Violation("cannot connect to a live nbdkit: %s" % e)
            time.sleep(0.01)


class Files:
    def __init__(self, root):
        self.root = root
        self.disk = os.path.join(root, "disk.raw")
        self.logdir = self.disk + ".vrlog"
        self.replica = os.path.join(root, "replica.raw")
        self.sock = os.path.join(root, "nbd.sock")
        self.ctl = os.path.join(root, "ctl.sock")
        self.hashlog = os.path.join(root, "hashes")
        self.nbdkit_log = os.path.join(root, "nbdkit.log")


def fresh(root, name, size=4 << 20):
    """Files of a new scenario under root/name: disk and replica of size
    bytes (the named scenarios of plugin-order.py and plugin-stop.py)."""
    d = Files(os.path.join(root, name))
    os.makedirs(d.root)
    for p in (d.disk, d.replica):
        with open(p, "wb") as f:
            f.truncate(size)
    return d


# Named scenarios count their failed checks here.
FAILS = []


def check(cond, what):
    print("%s - %s" % ("ok" if cond else "FAIL", what))
    if not cond:
        FAILS.append(what)
    return cond


class ScenarioArgs:
    """What Plugin needs of the harness's options, for named scenarios."""
    threads = 16


class Shipper:
    """Seals and ships the way vmreplicad does, and checks each cycle."""

    def __init__(self, args, d, plugin, rng, state):
        self.args, self.d, self.plugin, self.rng = args, d, plugin, rng
        self.state = state
        self.stop = threading.Event()
        self.error = None

    def hashes(self):
        out = {}
        try:
            with open(self.d.hashlog) as f:
                for line in f:
                    c, _disk, h = line.split()
                    out[int(c)] = h
        except FileNotFoundError:
            pass
        return out

    def sealed(self):
        return sorted(int(n[:20]) for n in os.listdir(self.d.logdir)
                      if n.endswith(".log"))

    def apply(self, c):
        """Apply sealed cycle c to the replica and check it."""
        st = self.state
        if c != st["applied"] + 1:
            raise Violation("cycle %d sealed after %d: a cycle is missing"
                            % (c, st["applied"]))
        seg = os.path.join(self.d.logdir, seg_name(c, True))
        for kind, off, ln in read_records(seg):
            st["records"][(KEY[kind], off, ln)] += 1
        r = subprocess.run([self.args.cycapply, self.d.logdir, str(c),
                            self.d.disk, self.d.replica],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise Violation("cycapply of cycle %d: %s" % (c, r.stderr.strip()))
        st["applied"] = c
        want = self.hashes().get(c)
        if want is not None and sha256_file(self.d.replica) != want:
            raise Violation("replica after cycle %d differs from the primary "
                            "disk at its seal" % c)
        st["cycles_checked"] += want is not None

    def retire(self, upto):
        """SHIPPED upto, then remove the segments and preserve files of the
        cycles it covers (the oldest .log left tells a restarted plugin what
        is shipped).  Stops at the first failure: a dead plugin."""
        if self.plugin.ctl("SHIPPED %d" % upto) != "OK %d" % upto:
            return False
        for c in self.sealed():
            if c > upto:
                break
            seg = os.path.join(self.d.logdir, seg_name(c, True))
            spare = os.path.join(self.d.logdir, "spare")
            try:
                os.link(seg, spare)  # never replace a spare (RENAME_NOREPLACE)
            except FileExistsError:
                pass
            os.unlink(seg)
            try:
                os.unlink(os.path.join(self.d.logdir, "%020d.pre" % c))
            except FileNotFoundError:
                pass
        return True

    def catch_up(self, lag):
        sealed = self.sealed()
        for c in sealed:
            if c > self.state["applied"] and c + lag <= sealed[-1]:
                self.apply(c)
        if self.state["applied"] > 0 and sealed and \
                sealed[0] <= self.state["applied"]:
            self.retire(self.state["applied"])

    def run(self):
        try:
            while not self.stop.is_set():
                time.sleep(self.rng.uniform(0.002, self.args.seal_ms / 1000))
                if self.stop.is_set():
                    break
                r = self.plugin.ctl("SEAL")
                if r is None:
                    break
                if not r.startswith("OK "):
                    raise Violation("SEAL: %s" % r)
                self.catch_up(self.rng.randint(0, 2))
        except Violation as e:
            self.error = e


class Client:
    """QD requests in flight over the hot region until told to stop."""

    def __init__(self, args, d, rng, state):
        self.args, self.d, self.rng, self.state = args, d, rng, state
        self.pool = bytearray(os.urandom(1 << 20))

    def run(self, until, plugin):
        st, rng, a = self.state, self.rng, self.args
        # None: a fault point hit by the shipper's first SEAL.
        h = nbd_connect(self.d.sock, plugin)
        if h is None:
            return None
        inflight = {}
        failed = []

        def done(cookie_box, op):
            def cb(err):
                inflight.pop(cookie_box[0], None)
                if err.value == 0:
                    if op[0] != "f":
                        st["completed"][op] += 1
                    st["ops_ok"] += 1
                else:
                    failed.append((op, err.value))
                return 1
            return cb

        try:
            while True:
                now = time.monotonic()
                if now >= until or not plugin.alive():
                    break
                while len(inflight) < a.qd:
                    r = rng.random()
                    blk = 512 if rng.random() < 0.7 else 1
                    off = rng.randrange(0, a.hot // blk) * blk
                    ln = min(rng.choice([512, 4096, 4096, 8192, 65536,
                                         rng.randrange(1, 65536)]),
                             a.size - off)
                    flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                    box = [None]
                    if r < 0.75:
                        op = ("w", off, ln)
                        po = rng.randrange(0, len(self.pool) - ln)
                        buf = nbd.Buffer.from_bytearray(self.pool[po:po + ln])
                        box[0] = h.aio_pwrite(buf, off, completion=done(box, op),
                                              flags=flags)
                    elif r < 0.87:
                        op = ("z", off, ln)
                        box[0] = h.aio_zero(ln, off, completion=done(box, op),
                                            flags=flags)
                    elif r < 0.99:
                        op = ("t", off, ln)
                        box[0] = h.aio_trim(ln, off, completion=done(box, op),
                                            flags=flags)
                    else:
                        op = ("f", 0, 0)
                        box[0] = h.aio_flush(completion=done(box, op))
                    inflight[box[0]] = op
                    st["ops_sent"] += 1
                h.poll(max(1, int((until - now) * 1000)) if until > now else 1)
        except nbd.Error:
            pass  # the server died
        # A request that failed while the server was alive is a violation
        # (nothing here makes the disk or the log fail); once the server is
        # dead the outcome of those in flight is unknown.
        if failed:
            try:  # a connection cut by a dying nbdkit: let it finish dying
                plugin.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if plugin.alive() and failed:
                raise Violation("requests failed while nbdkit was alive: %s"
                                % failed[:5])
        return h


def check_completed(state):
    recs, comp = state["records"], state["completed"]
    for op, n in comp.items():
        if recs[op] < n:
            raise Violation("%d completed %s request(s) at offset %d length "
                            "%d but %d record(s) in the log"
                            % (n, {"w": "write", "z": "zero",
                                   "t": "trim"}[op[0]], op[1], op[2],
                               recs[op]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--cycapply", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--hot", type=int, default=256 << 10)
    ap.add_argument("--qd", type=int, default=48)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--round-ms", type=int, default=80)
    ap.add_argument("--seal-ms", type=int, default=25)
    ap.add_argument("--fault-rate", type=float, default=0.5)
    a = ap.parse_args()

    rng = random.Random(a.seed)
    d = Files(a.dir)
    with open(d.disk, "wb") as f:
        f.truncate(a.size)
    with open(d.replica, "wb") as f:
        f.truncate(a.size)
    state = {"applied": 0, "records": collections.Counter(),
             "completed": collections.Counter(), "ops_sent": 0, "ops_ok": 0,
             "cycles_checked": 0, "faults_hit": collections.Counter()}
    plugin = Plugin(a, d)
    client = Client(a, d, rng, state)
    fault = None
    t0 = time.monotonic()
    plugin.start()
    try:
        for rnd in range(1, a.rounds + 1):
            shipper = Shipper(a, d, plugin, random.Random(rng.random()), state)
            th = threading.Thread(target=shipper.run)
            th.start()
            until = time.monotonic() + rng.uniform(0.005, a.round_ms / 1000)
            try:
                h = client.run(until, plugin)
            finally:
                if fault and not plugin.alive():
                    state["faults_hit"][fault.split(":")[0]] += 1
                plugin.kill()
                shipper.stop.set()
                th.join()
            if shipper.error:
                raise Violation("round %d (fault %s): %s"
                                % (rnd, fault, shipper.error))
            del h
            ended = "%s (%s)" % (fault or "SIGKILL", "hit" if fault and
                                 state["faults_hit"][fault.split(":")[0]]
                                 and not plugin.alive() else "killed")
            fault = None
            if rng.random() < a.fault_rate:
                fault = "%s:%d" % (rng.choice(FAULTS), rng.randint(1, 12))
            # Recovery runs without a fault; the next round's may have one.
            plugin.start()
            r = plugin.ctl("SEAL")
            if r is None or not r.startswith("OK "):
                raise Violation("round %d, after %s: SEAL after restart: %s"
                                % (rnd, ended, r))
            ship = Shipper(a, d, plugin, rng, state)
            try:
                ship.catch_up(0)
                check_completed(state)
                if sha256_file(d.replica) != sha256_file(d.disk):
                    raise Violation("after restart the replica differs from "
                                    "the primary disk")
            except Violation as e:
                raise Violation("round %d, after %s: %s" % (rnd, ended, e))
            if fault:
                plugin.kill()
                plugin.start(fault)
    except Violation as e:
        print("plugin-crash: VIOLATION (seed %d): %s" % (a.seed, e))
        plugin.kill()
        return 1
    plugin.kill()
    print("plugin-crash: %d rounds, seed %d, %.1f s: %d requests sent, %d "
          "completed and found in the log, %d cycles checked against the "
          "primary, fault points hit: %s; violations: 0"
          % (a.rounds, a.seed, time.monotonic() - t0, state["ops_sent"],
             sum(state["completed"].values()), state["cycles_checked"],
             dict(state["faults_hit"]) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
