#!/usr/bin/python3
"""plugin-stop.py: replication never fails the guest (issue #11, item 4).
When the change log cannot follow the disk, the data plane stops tracking
instead of failing writes; every write from then on marks its grains in a
dirty map before reaching the disk; a marker in the log directory says so
durably first; REARM starts a new log and leaves the map of what changed
untracked, and a replica brought up to date from the map and the new
cycles equals the disk.  Scenarios:

log-full
    The log directory is an 8 MiB tmpfs and 32 writes, zeroes and trims are
    kept in flight (log=data, so records fill it fast) while cycles are
    sealed; three are shipped, then the link is "down" and the log grows
    until the file system is full.  No request fails; the disk holds
    exactly what was written; SEAL and STATUS say tracking stopped and why;
    the marker says stopped.  REARM voids the unshipped cycles (freeing
    their space) and the replica, given the cycles shipped before, the
    dirty regions and the cycles after, ends byte-identical to the disk;
    the regions are far smaller than the disk.

preserve-failure
    A write to a block of sealed cycle 1 whose preserve cannot be written
    (the preserve file's name is taken by a directory) succeeds, tracking
    stops, and cycle 1 is never shipped after it (the marker says stopped
    before the write reaches the disk).

marker-first
    nbdkit is killed at the first untracked write (fault point
    track-untracked, just after the dirty mark): after the restart the
    plugin is still stopped, every grain is dirty (the map was in memory),
    and REARM then brings the replica to the disk.

host-restart
    While the disks are served the marker names the host's boot; a clean
    stop writes it back plain.  Started again under another boot after a
    clean stop, or after a kill under the same boot (the page cache
    survived), the plugin goes on tracking; after a kill and another boot
    (a host crash: unflushed writes may be on the disk without records) it
    starts with tracking stopped and every grain dirty.

damaged-log
    A log whose open segment has a garbage header used to keep nbdkit from
    starting, so the VM could not start: now the disks are served, writes
    succeed and tracking is stopped with the reason.
"""
import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "plugin_crash", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "plugin-crash.py"))
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)

GRAIN = 1 << 16


def block_preserve(d, cycle):
    """Make every preserve of cycle fail: its file's name is taken by a
    directory that is not empty (not removable as a torn file).  Returns
    the directory, to remove once the failure is seen."""
    pre = os.path.join(d.logdir, "%020d.pre" % cycle)
    os.mkdir(pre)
    os.mkdir(os.path.join(pre, "x"))
    return pre


def marker(d):
    try:
        with open(os.path.join(d.logdir, "tracking"), "rb") as f:
            return f.read().rstrip(b"\0").decode()
    except FileNotFoundError:
        return None


def read_dirty(path):
    """The runs of a C.dirty file (lib/dirtymap.c) as (offset, length)."""
    b = open(path, "rb").read()
    assert b[:8] == b"VRDIRTY1", "not a dirty map"
    size, shift = struct.unpack_from("<QI", b, 8)
    nbits = struct.unpack_from("<Q", b, 24)[0]
    words = struct.unpack_from("<%dQ" % ((nbits + 63) // 64), b, 40)
    runs = []
    for g in range(nbits):
        if words[g // 64] >> (g % 64) & 1:
            off = g << shift
            ln = min(size - off, 1 << shift)
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], runs[-1][1] + ln)
            else:
                runs.append((off, ln))
    return runs


def copy_runs(d, runs):
    """Resynchronize: the replica takes the disk's data in runs."""
    with open(d.disk, "rb") as src, open(d.replica, "r+b") as dst:
        for off, ln in runs:
            src.seek(off)
            dst.seek(off)
            dst.write(src.read(ln))


def resync_and_check(a, d, p, h, runs, next_cycle):
    """After REARM: the replica takes the dirty runs from the disk, one more
    write is sealed as next_cycle and applied: the replica must equal the
    disk."""
    copy_runs(d, runs)
    h.pwrite(b"\x77" * 4096, 4096)
    pc.check(p.ctl("SEAL") == "OK %d" % next_cycle, "cycle %d sealed" % next_cycle)
    if apply_cycles(a, d, next_cycle, next_cycle):
        pc.check(pc.sha256_file(d.replica) == pc.sha256_file(d.disk),
              "the replica equals the disk")


def apply_cycles(a, d, first, last):
    for c in range(first, last + 1):
        r = subprocess.run([a.cycapply, d.logdir, str(c), d.disk, d.replica],
                           capture_output=True, text=True)
        if not pc.check(r.returncode == 0, "cycle %d applies (%s)" %
                     (c, r.stderr.strip())):
            return False
    return True


class Load:
    """QD requests in flight over a region, with a model of the disk."""

    def __init__(self, h, size, seed, span=None):
        self.h, self.size, self.span = h, size, span or size
        self.rng = random.Random(seed)
        self.model = bytearray(size)
        self.failed = []
        self.done = 0

    def run(self, n, qd=32, between=None):
        h, rng = self.h, self.rng
        inflight = 0
        busy = set()  # grains (4 KiB) in flight: no two requests share one

        def cb(op, blocks):
            def f(err):
                nonlocal inflight
                inflight -= 1
                busy.difference_update(blocks)
                self.done += 1
                if err.value != 0:
                    self.failed.append((op, err.value))
                return 1
            return f
        sent = 0
        while sent < n or inflight:
            while sent < n and inflight < qd:
                ln = rng.choice([4096, 8192, 65536])
                off = rng.randrange(0, self.span - ln, 4096)
                blocks = set(range(off // 4096, (off + ln) // 4096))
                if blocks & busy:
                    break
                busy |= blocks
                op = rng.choice("wwwwwzt")
                inflight += 1
                sent += 1
                if op == "w":
                    data = bytes([rng.randrange(1, 256)]) * ln
                    self.model[off:off + ln] = data
                    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                 off, completion=cb(op, blocks),
                                 flags=nbd.CMD_FLAG_FUA if rng.random() < .05
                                 else 0)
                elif op == "z":
                    self.model[off:off + ln] = bytes(ln)
                    h.aio_zero(ln, off, completion=cb(op, blocks))
                else:
                    self.model[off:off + ln] = bytes(ln)
                    h.aio_trim(ln, off, completion=cb(op, blocks))
                if between and sent % 64 == 0:
                    between()
            h.poll(-1 if inflight else 0)


def log_full(a, root):
    size = 64 << 20
    d = pc.fresh(root, "full", size)
    os.makedirs(d.logdir)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                        d.logdir], capture_output=True, text=True)
    if r.returncode != 0:
        pc.check(False, "mount a small tmpfs for the log: %s" % r.stderr.strip())
        return
    try:
        p = pc.Plugin(a, d, ["log=data"])
        p.start()
        h = pc.nbd_connect(d.sock, p)
        load = Load(h, size, 11, span=16 << 20)
        seals, shipped = [], [0]

        def seal():
            # The daemon's part: seal, and ship the first three cycles
            # at once (apply, SHIPPED, delete); then the link is down and
            # the log grows until its file system is full.
            r = p.ctl("SEAL")
            seals.append(r)
            if r.startswith("OK ") and shipped[0] < 3:
                c = int(r.split()[1])
                if apply_cycles(a, d, c, c) and \
                        p.ctl("SHIPPED %d" % c) == "OK %d" % c:
                    os.unlink(os.path.join(d.logdir, "%020d.log" % c))
                    shipped[0] = c
        load.run(4000, between=seal)
        stopped = [s for s in seals if not s.startswith("OK")]
        pc.check(not load.failed, "no guest request failed while the log filled "
              "(%d requests, %d failed: %s)" % (load.done, len(load.failed),
                                                load.failed[:3]))
        pc.check(shipped[0] == 3 and bool(stopped), "three cycles shipped, then "
              "the log filled: a SEAL was refused (%d sealed)"
              % (len(seals) - len(stopped)))
        st = p.ctl("STATUS")
        pc.check(st.startswith("ERR tracking stopped:") and
              "No space left on device" in st,
              "STATUS says tracking stopped and why: %s" % st)
        pc.check(marker(d).startswith("vmreplica stopped"),
              "the marker says stopped: %r" % marker(d)[:80])
        h.flush()
        pc.check(open(d.disk, "rb").read() == bytes(load.model),
              "the disk holds exactly what the guest wrote")
        r = p.ctl("REARM")
        if not pc.check(r.startswith("OK "), "REARM, which frees the void "
                     "cycles' logs: %s" % r):
            return
        voided = int(r.split()[1])
        pc.check(marker(d).startswith("vmreplica tracking\nserved "),
              "the marker says tracking, served: %r" % marker(d))
        pc.check(sorted(n for n in os.listdir(d.logdir)
                     if n.endswith((".log", ".pre"))) == [],
              "the void cycles' logs are gone")
        runs = read_dirty(os.path.join(d.logdir, "%020d.dirty" % voided))
        nbytes = sum(ln for _, ln in runs)
        pc.check(0 < nbytes < size // 2, "the dirty map covers %d of %d bytes"
              % (nbytes, size))
        copy_runs(d, runs)
        load.run(300)
        pc.check(not load.failed, "no request failed after REARM")
        r = p.ctl("SEAL")
        pc.check(r == "OK %d" % (voided + 1), "cycle %d seals after REARM: %s"
              % (voided + 1, r))
        if apply_cycles(a, d, voided + 1, voided + 1):
            pc.check(pc.sha256_file(d.replica) == pc.sha256_file(d.disk),
                  "replica (cycles 1..3, the dirty regions, cycle %d) equals "
                  "the disk" % (voided + 1))
        del h
        p.kill()
    finally:
        subprocess.run(["umount", "-l", d.logdir])


def preserve_failure(a, root):
    d = pc.fresh(root, "preserve", 4 << 20)
    p = pc.Plugin(a, d)
    p.start()
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x44" * 8192, 0)
    pc.check(p.ctl("SEAL") == "OK 1", "cycle 1 sealed")
    pre = block_preserve(d, 1)
    try:
        h.pwrite(b"\x55" * 4096, 0)
        ok = True
    except nbd.Error as e:
        ok = False
        print("  ", e)
    pc.check(ok, "a write whose preserve fails succeeds")
    h.pwrite(b"\x56" * 4096, 1 << 20, nbd.CMD_FLAG_FUA)
    h.zero(4096, 2 << 20)
    h.flush()
    pc.check(open(d.disk, "rb").read(4096) == b"\x55" * 4096,
          "the disk holds the write")
    r = p.ctl("SEAL")
    pc.check(r.startswith("ERR tracking stopped: disk disk0: could not preserve "
                       "data of an unshipped cycle"), "SEAL refused: %s" % r)
    pc.check(marker(d).startswith("vmreplica stopped 2\n"),
          "the marker says stopped in cycle 2")
    shutil.rmtree(pre)
    r = p.ctl("REARM")
    pc.check(r == "OK 2", "REARM voids cycles 1 and 2: %s" % r)
    runs = read_dirty(os.path.join(d.logdir, "%020d.dirty" % 2))
    pc.check(runs == [(0, GRAIN), (1 << 20, GRAIN), (2 << 20, GRAIN)],
          "dirty: cycle 1's write and the three writes since: %s" % runs)
    resync_and_check(a, d, p, h, runs, 3)
    del h
    p.kill()


def marker_first(a, root):
    d = pc.fresh(root, "marker", 4 << 20)
    p = pc.Plugin(a, d)
    p.start("track-untracked:1")
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x11" * 4096, 0)
    pc.check(p.ctl("SEAL") == "OK 1", "cycle 1 sealed")
    pre = block_preserve(d, 1)
    try:
        h.pwrite(b"\x22" * 4096, 0)
    except nbd.Error:
        pass
    p.proc.wait(10)
    pc.check(not p.alive(), "nbdkit killed at its first untracked write")
    pc.check(marker(d).startswith("vmreplica stopped"),
          "the marker said stopped before that write")
    shutil.rmtree(pre)
    p.start()
    r = p.ctl("SEAL")
    pc.check(r.startswith("ERR tracking stopped: disk disk0: could not preserve"),
          "after the restart tracking is still stopped, same reason: %s" % r)
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x33" * 4096, 8192)
    r = p.ctl("REARM")
    pc.check(r == "OK 2", "REARM: %s" % r)
    runs = read_dirty(os.path.join(d.logdir, "%020d.dirty" % 2))
    pc.check(runs == [(0, 4 << 20)], "every grain is dirty after the restart "
          "(the map was in memory): %s" % runs)
    resync_and_check(a, d, p, h, runs, 3)
    del h
    p.kill()


def damaged_log(a, root):
    d = pc.fresh(root, "damaged", 4 << 20)
    p = pc.Plugin(a, d)
    p.start()
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x11" * 4096, 0)
    del h
    p.kill()
    seg = os.path.join(d.logdir, "%020d.open" % 1)
    with open(seg, "r+b") as f:
        f.write(b"\xa5" * 64)
    p.start()
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x22" * 4096, 4096)
    pc.check(open(d.disk, "rb").read(8192) == b"\x11" * 4096 + b"\x22" * 4096,
          "the disks are served and writes succeed")
    r = p.ctl("STATUS")
    pc.check(r.startswith("ERR tracking stopped: change log recovery:"),
          "tracking stopped with the reason: %s" % r)
    r = p.ctl("REARM")
    pc.check(r == "OK 1", "REARM replaces the damaged log: %s" % r)
    pc.check(p.ctl("SEAL") == "OK 2", "cycle 2 seals")
    del h
    p.kill()


def start_as_boot(p, boot):
    """Start nbdkit as if the host had booted as boot."""
    os.environ["VMREPLICA_TEST_BOOT_ID"] = boot
    try:
        p.start()
    finally:
        del os.environ["VMREPLICA_TEST_BOOT_ID"]


def host_restart(a, root):
    d = pc.fresh(root, "boot", 4 << 20)
    p = pc.Plugin(a, d)
    start_as_boot(p, "boot-a")
    pc.check(marker(d) == "vmreplica tracking\nserved boot-a\n",
          "while served, the marker names the boot: %r" % marker(d))
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x11" * 4096, 0)
    pc.check(p.ctl("SEAL") == "OK 1", "cycle 1 sealed")
    h.pwrite(b"\x22" * 4096, 1 << 20)
    del h
    p.proc.terminate()
    p.proc.wait(20)
    pc.check(marker(d) == "vmreplica tracking\n",
          "a clean stop leaves a plain tracking marker: %r" % marker(d))
    start_as_boot(p, "boot-b")
    pc.check(p.ctl("SEAL") == "OK 2", "after a clean stop and a host restart "
          "tracking goes on")
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x33" * 4096, 2 << 20)
    del h
    p.kill()
    start_as_boot(p, "boot-b")
    pc.check(p.ctl("SEAL") == "OK 3", "after a kill under the same boot (page "
          "cache intact) tracking goes on")
    p.kill()
    start_as_boot(p, "boot-c")
    r = p.ctl("STATUS")
    pc.check(r.startswith("ERR tracking stopped: disk disk0: the host went down "
                       "while the disks were served (boot boot-b; now "
                       "boot-c)"), "a kill then another boot: a host crash, "
          "tracking stopped: %s" % r)
    r = p.ctl("REARM")
    pc.check(r == "OK 4", "REARM: %s" % r)
    runs = read_dirty(os.path.join(d.logdir, "%020d.dirty" % 4))
    # No activity-log checkpoint since the writes (the first comes a
    # minute after start): the extent they were in is suspect, and one
    # 16 MiB extent covers this whole 4 MiB disk.
    pc.check(runs == [(0, 4 << 20)], "the activity log's extent (the whole "
          "4 MiB disk) is dirty: %s" % runs)
    h = pc.nbd_connect(d.sock, p)
    resync_and_check(a, d, p, h, runs, 5)
    del h
    p.kill()


def activity_log(a, root):
    """Only the extents written since the last checkpoint are suspect after
    a host crash, not the whole disk."""
    d = pc.fresh(root, "activity", 64 << 20)
    p = pc.Plugin(a, d, ["alcheckpoint=1"])
    start_as_boot(p, "boot-a")
    h = pc.nbd_connect(d.sock, p)
    h.pwrite(b"\x11" * 4096, 0)
    h.pwrite(b"\x22" * 4096, 40 << 20)
    time.sleep(1.2)
    pc.check(p.ctl("SEAL") == "OK 1", "cycle 1 sealed, with a checkpoint")
    h.pwrite(b"\x33" * 4096, (20 << 20) + 8192)
    del h
    p.kill()
    start_as_boot(p, "boot-b")
    r = p.ctl("REARM")
    pc.check(r == "OK 2", "after the host crash, REARM: %s" % r)
    runs = read_dirty(os.path.join(d.logdir, "%020d.dirty" % 2))
    want = [(0, 65536), (16 << 20, 16 << 20), (40 << 20, 65536)]
    pc.check(runs == want, "dirty: the 16 MiB extent written since the "
          "checkpoint and the unshipped records' grains, not the 64 MiB "
          "disk: %s" % runs)
    h = pc.nbd_connect(d.sock, p)
    resync_and_check(a, d, p, h, runs, 3)
    del h
    p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--cycapply", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    a = pc.ScenarioArgs()
    a.plugin, a.cycapply = args.plugin, args.cycapply
    for name, fn in [("log-full", log_full),
                     ("preserve-failure", preserve_failure),
                     ("marker-first", marker_first),
                     ("damaged-log", damaged_log),
                     ("host-restart", host_restart),
                     ("activity-log", activity_log)]:
        if args.only and args.only != name:
            continue
        print("# %s" % name)
        try:
            fn(a, args.dir)
        except pc.Violation as e:
            pc.check(False, "%s: %s" % (name, e))
    print("plugin-stop: %d failed" % len(pc.FAILS))
    return 1 if pc.FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
