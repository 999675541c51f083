#!/usr/bin/python3
"""plugin-order.py: named scenarios for the data plane's ordering rules
(issue #9, defects 1 and 8), each built to fail on the code before its
fix (defect 3, a failed preserve, is now plugin-stop.py's
preserve-failure: tracking stops and the write succeeds):

completed-write-survives (defect 1)
    Request A (a write to a block of a sealed, unshipped cycle) stalls
    right after its record is reserved (fault point track-reserved with a
    pause); request B, reserved after it on another block, is sent with
    FUA.  B must not complete while A's record is unwritten (or, if it
    does, its record must survive); nbdkit is killed during A's stall and
    after the restart the replica rebuilt from the log equals the disk.

seal-durable-before-next (defect 8)
    With sealsync=on, under strace, every seal makes the sealed segment
    durable (fdatasync of CYCLE.open, with its seal record) before the next
    segment is created, so no power loss can leave a next segment beside a
    sealed one that lost its seal.  (The default is now sealsync=off: a
    power loss is detected by the tracking marker and resynchronized, so
    no log is trusted after one; plugin-stop.sh host-restart.)
"""
import argparse
import hashlib
import os
import re
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


def connect(d, p):
    h = pc.nbd_connect(d.sock, p)
    assert h is not None, "nbdkit died at start"
    return h


def seal_and_apply(a, d, plugin):
    """Seal the open cycle and apply every sealed cycle to the replica,
    checking each against the primary at its seal: (ok, state)."""
    r = plugin.ctl("SEAL")
    state = {"applied": 0, "records": pc.collections.Counter(),
             "completed": pc.collections.Counter(), "cycles_checked": 0}
    try:
        pc.Shipper(a, d, plugin, None, state).catch_up(0)
    except pc.Violation as e:
        print("  ", e)
        return False, state
    return bool(r and r.startswith("OK")), state


def completed_write_survives(a, root):
    d = pc.fresh(root, "order")
    p = pc.Plugin(a, d)
    p.start()
    h = connect(d, p)
    h.pwrite(b"\x11" * 4096, 0)
    assert p.ctl("SEAL") == "OK 1"
    del h
    p.kill()
    # A (the first write after the restart) stalls 4 s after reserving.
    p.start("track-reserved:1:pause=4000")
    h = connect(d, p)
    done = {}

    def cb(name):
        def f(err):
            done[name] = err.value
            return 1
        return f
    a_buf = nbd.Buffer.from_bytearray(bytearray(b"\x22" * 4096))
    b_buf = nbd.Buffer.from_bytearray(bytearray(b"\x33" * 4096))
    h.aio_pwrite(a_buf, 0, completion=cb("A"))
    t = time.monotonic() + 0.5
    while time.monotonic() < t:
        h.poll(50)
    h.aio_pwrite(b_buf, 1 << 20, completion=cb("B"), flags=nbd.CMD_FLAG_FUA)
    t = time.monotonic() + 1.5
    while time.monotonic() < t and "B" not in done:
        h.poll(50)
    b_done = done.get("B") == 0
    pc.check("A" not in done, "A is stalled after its reservation")
    pc.check(not b_done, "B (reserved after A, FUA) does not complete while "
          "A's record is unwritten")
    p.kill()
    del h
    p.start()
    ok, state = seal_and_apply(a, d, p)
    pc.check(ok, "after the restart every cycle rebuilds equal to the primary "
          "at its seal")
    if b_done:
        pc.check(state["records"][("w", 1 << 20, 4096)] >= 1,
              "B completed, so its record is in the log")
    pc.check(pc.sha256_file(d.replica) == pc.sha256_file(d.disk),
          "the replica equals the disk after the kill (B's data, if on the "
          "disk, is in the log)")
    p.kill()


def seal_durable_before_next(a, root):
    d = pc.fresh(root, "seal")
    trace = os.path.join(root, "strace.out")
    env = dict(os.environ)
    env.pop("VMREPLICA_FAULT", None)
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-yy", "-o", trace, "-e",
         "trace=fdatasync,fsync,ftruncate,openat,renameat,renameat2,rename",
         "nbdkit", "--foreground", "--unix", d.sock, a.plugin,
         "disk=disk0:" + d.disk, "control=" + d.ctl, "sealsync=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while not (os.path.exists(d.sock) and os.path.exists(d.ctl)):
        if time.monotonic() > deadline or proc.poll() is not None:
            pc.check(False, "nbdkit under strace started")
            return
        time.sleep(0.01)
    p = pc.Plugin(a, d)
    p.proc = proc
    h = connect(d, p)
    for c in range(1, 4):
        h.pwrite(bytes([c]) * 65536, c * 65536)
        pc.check(p.ctl("SEAL") == "OK %d" % c, "seal %d" % c)
    del h
    p.kill()
    lines = open(trace).read().splitlines()
    for c in range(1, 4):
        cur, nxt = "%020d.open" % c, "%020d.open" % (c + 1)
        made = next((i for i, ln in enumerate(lines)
                     if nxt in ln and ("O_CREAT" in ln or "renameat" in ln)),
                    None)
        def calls(name):
            return [i for i, ln in enumerate(lines)
                    if re.match(r"(\d+\s+)?%s\(" % name, ln)
                    and cur + ">" in ln and (made is None or i < made)]
        # The seal's cut ends with an ftruncate of the segment to its seal
        # record; a sync of it must come between that and the next segment.
        cuts = calls("ftruncate")
        synced = [i for i in calls("fdatasync") if cuts and i > cuts[-1]]
        pc.check(made is not None and cuts and synced,
              "cycle %d's segment is fdatasynced after its seal is cut and "
              "before cycle %d's is created (cut at %s, sync at %s, create "
              "at %s)" % (c, c + 1, cuts[-1:], synced[:1], made))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--cycapply", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    a = pc.ScenarioArgs()
    a.plugin, a.cycapply = args.plugin, args.cycapply
    for name, fn in [("completed-write-survives", completed_write_survives),
                     ("seal-durable-before-next", seal_durable_before_next)]:
        if args.only and args.only != name:
            continue
        print("# %s" % name)
        fn(a, args.dir)
    print("plugin-order: %d failed" % len(pc.FAILS))
    return 1 if pc.FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
