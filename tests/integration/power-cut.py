#!/usr/bin/python3
"""power-cut.py: power loss of the data plane's files.

nbdkit-vmreplica-plugin runs under tests/tools/libpowercut.so, which keeps
beside every file under the test directory a shadow of what its last
fsync/fdatasync made durable.  A libnbd client keeps QD writes, zeroes and
trims (512-byte aligned, each sector of a write stamped with the write's id,
some FUA, some flushes) in flight over four 128 KiB windows, one per 16 MiB
activity-log extent, moving to the next window every 0.7 s; a shipper thread seals
and ships cycles 0-2 late (cycapply into a replica, SHIPPED).  At a random
moment nbdkit is SIGKILLed: the live files are the page cache, the shadows
the disk.  Each of STATES power-loss states is built from them, sector by
sector (512 B, or whole 4 KiB pages): all unsynced sectors dropped, all
kept, or a seeded random subset.  nbdkit restarts on each state under
another boot id, and it checks:

  1. nbdkit starts and says tracking stopped because the host went down;
  2. every write, zero or trim the client saw complete and that a completed
     flush followed (or FUA) is on the disk: each sector holds that
     request's data or a later request's;
  3. REARM's dirty map covers every 64 KiB grain where the disk differs
     from the replica (built from the cycles shipped before the cut): the
     replica plus a resynchronization of the dirty regions is the disk;
  4. a write after the restart succeeds.

A failure of 2 or 3 is a data-loss event.  Prints the totals.
"""
import argparse
import collections
import importlib.util
import os
import random
import shutil
import signal
import struct
import sys
import threading
import time

_spec = importlib.util.spec_from_file_location(
    "plugin_crash", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "plugin-crash.py"))
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)
import nbd  # noqa: E402

SECTOR = 512
GRAIN = 1 << 16
EXTENT = 16 << 20
WIN = 128 << 10
SIZE = 64 << 20
WINDOWS = [i * EXTENT + (i * 3 + 1) * GRAIN for i in range(4)]


def pattern(op_id, sector):
    return struct.pack("<QQ", op_id, sector) * (SECTOR // 16)


class Shipper(pc.Shipper):
    """pc.Shipper, with its retirements (done by this process, outside the
    power-cut layer) mirrored on the shadows."""

    def __init__(self, *a, shadow_logdir):
        super().__init__(*a)
        self.shadow_logdir = shadow_logdir

    def retire(self, upto):
        before = set(os.listdir(self.d.logdir))
        ok = super().retire(upto)
        for n in before - set(os.listdir(self.d.logdir)):
            if n.endswith(".log") and not os.path.exists(
                    os.path.join(self.shadow_logdir, "spare")) and \
                    os.path.exists(os.path.join(self.d.logdir, "spare")):
                try:
                    os.link(os.path.join(self.shadow_logdir, n),
                            os.path.join(self.shadow_logdir, "spare"))
                except OSError:
                    pass
            try:
                os.unlink(os.path.join(self.shadow_logdir, n))
            except FileNotFoundError:
                pass
        return ok


class Client:
    """QD non-overlapping requests over the windows, with their history."""

    def __init__(self, rng, qd):
        self.rng, self.qd = rng, qd
        self.ops = [None]  # op id -> [kind, off, len, completed_at]
        self.flushes = []  # (completed ops when issued, completed)
        self.clock = 0
        self.failed = 0
        self.stop = threading.Event()

    def run(self, sock, plugin):
        h = pc.nbd_connect(sock, plugin)
        if h is None:
            return
        rng = self.rng
        inflight = {}
        t0 = time.monotonic()
        done_ids = []

        def cb_for(op_id):
            def cb(err):
                if err.value:
                    self.failed += not self.stop.is_set()
                else:
                    self.clock += 1
                    self.ops[op_id][3] = self.clock
                    done_ids.append(op_id)
                inflight.pop(op_id, None)
                return 0
            return cb

        try:
            while not self.stop.is_set():
                while len(inflight) < self.qd and not self.stop.is_set():
                    # One window (one activity-log extent) at a time, a
                    # new one every 0.7 s: checkpoints then leave the
                    # extents written before them out of the activity log.
                    win = int((time.monotonic() - t0) / 0.7) % 4
                    if rng.random() < 0.003:
                        fid = len(self.flushes)
                        self.flushes.append([set(done_ids), False])

                        def fcb(err, fid=fid):
                            if err.value:
                                self.failed += not self.stop.is_set()
                            else:
                                self.flushes[fid][1] = True
                            inflight.pop(("f", fid), None)
                            return 0
                        inflight[("f", fid)] = (0, 0)
                        h.aio_flush(completion=fcb)
                        continue
                    ln = rng.choice([1, 1, 2, 8, 8, 16, 64]) * SECTOR
                    off = WINDOWS[win] + rng.randrange(0, WIN - ln + 1,
                                                       SECTOR)
                    if any(o < off + ln and off < o + n
                           for o, n in inflight.values()):
                        break
                    op_id = len(self.ops)
                    r = rng.random()
                    kind = "w" if r < 0.75 else ("z" if r < 0.9 else "t")
                    fua = rng.random() < 0.03
                    self.ops.append([kind, off, ln, None, fua])
                    inflight[op_id] = (off, ln)
                    fl = nbd.CMD_FLAG_FUA if fua else 0
                    if kind == "w":
                        buf = b"".join(pattern(op_id, off // SECTOR + i)
                                       for i in range(ln // SECTOR))
                        h.aio_pwrite(buf, off, completion=cb_for(op_id),
                                     flags=fl)
                    elif kind == "z":
                        h.aio_zero(ln, off, completion=cb_for(op_id),
                                   flags=fl)
                    else:
                        h.aio_trim(ln, off, completion=cb_for(op_id),
                                   flags=fl)
                h.poll(1)
        except nbd.Error:
            pass  # nbdkit killed: the requests in flight never completed

    def durable(self):
        """Op ids whose data a completed flush or FUA made durable."""
        d = set()
        for seen, ok in self.flushes:
            if ok:
                d |= seen
        for i in range(1, len(self.ops)):
            if self.ops[i][3] is not None and self.ops[i][4]:
                d.add(i)
        return d


def check_durable(cl, disk_path):
    """Each sector holds its last durable request's content or a later
    request's.  Returns the number of bad sectors."""
    durable = cl.durable()
    by_sector = collections.defaultdict(list)
    for i in range(1, len(cl.ops)):
        _k, off, ln = cl.ops[i][:3]
        for s in range(off // SECTOR, (off + ln) // SECTOR):
            by_sector[s].append(i)
    bad = 0
    with open(disk_path, "rb") as f:
        for s, ids in by_sector.items():
            last = max((i for i in ids if i in durable), default=None)
            allowed = [i for i in ids if last is None or i >= last]
            f.seek(s * SECTOR)
            got = f.read(SECTOR)
            ok = last is None and got == bytes(SECTOR)  # initial content
            for i in allowed:
                want = pattern(i, s) if cl.ops[i][0] == "w" else bytes(SECTOR)
                ok = ok or got == want
            if not ok:
                bad += 1
                if bad == 1:
                    print("sector %d: holds %r, durable op %s; requests on it: %s"
                      % (s, got[:16], last, [(i, cl.ops[i][0], cl.ops[i][4],
                                              cl.ops[i][3] is not None)
                                             for i in ids[-6:]]))
    return bad


def files_of(root):
    out = [os.path.join(root, "disk.raw")]
    ld = os.path.join(root, "disk.raw.vrlog")
    out += [os.path.join(ld, n) for n in sorted(os.listdir(ld))]
    return [p for p in out if os.path.isfile(p)]


def build_state(rng, live_root, shadow_root, out_root, mode):
    """Copy live_root's files into out_root as a power loss would leave
    them.  Returns the number of unsynced sectors and how many were kept."""
    shutil.copytree(live_root, out_root, ignore=shutil.ignore_patterns(
        "*.sock", "nbdkit.log", "hashes", "replica.raw"))
    p = {"drop": 0.0, "keep": 1.0}.get(mode, rng.random())
    unsynced = kept = 0
    for path in files_of(out_root):
        rel = os.path.relpath(path, out_root)
        try:
            with open(os.path.join(shadow_root, rel), "rb") as f:
                synced = f.read()
        except FileNotFoundError:
            synced = b""
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            for pos in range(0, size, 1 << 20):
                f.seek(pos)
                live = f.read(1 << 20)
                sy = synced[pos:pos + len(live)]
                sy += bytes(len(live) - len(sy))
                if live == sy:
                    continue
                unit = 4096 if mode == "pages" else SECTOR
                for o in range(0, len(live), unit):
                    if live[o:o + unit] == sy[o:o + unit]:
                        continue
                    unsynced += 1
                    if rng.random() < p:
                        kept += 1
                    else:
                        f.seek(pos + o)
                        f.write(sy[o:o + unit])
    return unsynced, kept


def dirty_runs(path):
    b = open(path, "rb").read()
    size, shift = struct.unpack_from("<QI", b, 8)
    nbits = struct.unpack_from("<Q", b, 24)[0]
    words = struct.unpack_from("<%dQ" % ((nbits + 63) // 64), b, 40)
    return {g for g in range(nbits) if words[g // 64] >> (g % 64) & 1}, shift


def check_state(a, root, replica, cl, totals):
    """Restart on one power-loss state and check it; returns violations."""
    d = pc.Files(root)
    p = pc.Plugin(a, d)
    os.environ["VMREPLICA_TEST_BOOT_ID"] = "boot-after"
    try:
        p.start()
    except pc.Violation as e:
        print("VIOLATION: nbdkit does not start on the state: %s" % e)
        return 1
    finally:
        del os.environ["VMREPLICA_TEST_BOOT_ID"]
    bad = 0
    try:
        st = p.ctl("STATUS") or ""
        if "the host went down" not in st:
            print("VIOLATION: after the power loss STATUS says %r" % st)
            bad += 1
        r = p.ctl("REARM") or ""
        if not r.startswith("OK "):
            print("VIOLATION: REARM: %r" % r)
            return bad + 1
        c = int(r.split()[1])
        grains, shift = dirty_runs(os.path.join(d.logdir, "%020d.dirty" % c))
        n = check_durable(cl, d.disk)
        if n:
            print("VIOLATION: %d sectors lost a flushed request" % n)
            totals["data_loss"] += 1
            bad += 1
        with open(d.disk, "rb") as fd, open(replica, "rb") as fr:
            for w in WINDOWS:
                for g in range(w >> shift, (w + WIN - 1 >> shift) + 1):
                    fd.seek(g << shift)
                    fr.seek(g << shift)
                    if fd.read(1 << shift) != fr.read(1 << shift) and \
                            g not in grains:
                        print("VIOLATION: grain %d differs from the replica "
                              "and is not in the dirty map" % g)
                        totals["data_loss"] += 1
                        bad += 1
                        break
        totals["dirty_grains"] += len(grains)
        h = pc.nbd_connect(d.sock, p)
        try:
            h.pwrite(b"\x42" * 4096, WINDOWS[0])
            h.flush()
        except nbd.Error as e:
            print("VIOLATION: a write after the restart failed: %s" % e)
            bad += 1
        del h
    finally:
        p.kill()
    return bad


def one_cut(a, rng, n, totals):
    base = os.path.join(a.dir, "cut%d" % n)
    live, shadow = base + "/live", base + "/shadow"
    d = pc.fresh(base, "live", SIZE)
    os.makedirs(shadow)
    with open(os.path.join(shadow, "disk.raw"), "wb") as f:
        f.truncate(SIZE)
    p = pc.Plugin(a, d, ["alcheckpoint=1"])
    env = {"LD_PRELOAD": a.powercut, "POWERCUT_DIR": live,
           "POWERCUT_SHADOW": shadow, "VMREPLICA_TEST_BOOT_ID": "boot-before"}
    os.environ.update(env)
    try:
        p.start()
    finally:
        for k in env:
            del os.environ[k]
    state = {"applied": 0, "records": collections.Counter(),
             "cycles_checked": 0}
    sh = Shipper(a, d, p, random.Random(rng.random()), state,
                 shadow_logdir=os.path.join(shadow, "disk.raw.vrlog"))
    cl = Client(random.Random(rng.random()), a.qd)
    t1 = threading.Thread(target=cl.run, args=(d.sock, p))
    t2 = threading.Thread(target=sh.run)
    t1.start()
    t2.start()
    # Half the cuts soon after the writer moved to a new extent (its first
    # writes there), half at any moment.
    if rng.random() < 0.5:
        time.sleep(0.7 * rng.randint(1, 3) + rng.uniform(0.005, 0.08))
    else:
        time.sleep(rng.uniform(0.1, a.max_s))
    cl.stop.set()
    p.kill()
    sh.stop.set()
    t1.join()
    t2.join()
    totals["requests"] += len(cl.ops) - 1
    totals["cycles_shipped"] += state["applied"]
    bad = 0
    if cl.failed:
        print("VIOLATION: %d requests failed while nbdkit lived" % cl.failed)
        bad += 1
    for k in range(a.states):
        mode = ["drop", "keep", "sectors", "pages"][k % 4] if k < 4 else \
            rng.choice(["sectors", "pages"])
        out = base + "/state%d" % k
        uns, kept = build_state(rng, live, shadow, out, mode)
        totals["states"] += 1
        totals["unsynced"] += uns
        totals["kept"] += kept
        b = check_state(a, out, d.replica, cl, totals)
        if b:
            print("  cut %d state %d (%s): %d unsynced sectors, %d kept"
                  % (n, k, mode, uns, kept))
        bad += b
        if b and os.environ.get("KEEP"):
            print("  kept in %s" % out)
            continue
        shutil.rmtree(out)
    if not (bad and os.environ.get("KEEP")):
        shutil.rmtree(base)
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--cycapply", required=True)
    ap.add_argument("--powercut", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--cuts", type=int, default=8)
    ap.add_argument("--states", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--max-s", type=float, default=2.5)
    a = ap.parse_args()
    a.threads, a.seal_ms = 16, 200
    rng = random.Random(a.seed)
    totals = collections.Counter()
    bad = 0
    t0 = time.monotonic()
    for n in range(a.cuts):
        bad += one_cut(a, rng, n, totals)
    print("TOTAL cuts %d power-loss states %d requests %d cycles shipped %d "
          "unsynced sectors %d (kept %d) dirty grains %d data-loss events %d "
          "violations %d (%.0f s)" % (
              a.cuts, totals["states"], totals["requests"],
              totals["cycles_shipped"], totals["unsynced"], totals["kept"],
              totals["dirty_grains"], totals["data_loss"], bad,
              time.monotonic() - t0))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
