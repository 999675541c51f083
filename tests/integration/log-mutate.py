#!/usr/bin/python3
"""log-mutate.py: seeded mutations of real change logs and cycle payloads.

A short run of nbdkit-vmreplica-plugin makes the inputs: writes logged by
reference and with data (log=data), zeroes, trims, FUA, sealed cycles
rewritten before they ship (so preserve files exist), and a SIGKILL that
leaves an open segment.  Then tests/tools/logmut mutates every segment,
preserve file and sealed cycle's payload N times each and feeds them to
the real decoders (docs/reliability.md, "Log mutations"); any mutation
applied is a failure.  Prints the totals.
"""
import argparse
import importlib.util
import os
import random
import re
import subprocess
import sys

_spec = importlib.util.spec_from_file_location(
    "plugin_crash", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "plugin-crash.py"))
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)


def make_log(a, root, name, extra, rng):
    """One short session; returns its Files."""
    d = pc.fresh(root, name, 1 << 20)
    p = pc.Plugin(a, d, extra)
    p.start()
    h = pc.nbd_connect(d.sock, p)
    for cycle in range(1, 5):
        for _ in range(rng.randint(6, 20)):
            off = rng.randrange(0, 250) * 4096 + rng.choice([0, 512, 1000])
            ln = rng.choice([512, 4096, 7000, 16384])
            op = rng.random()
            fl = nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0
            if op < 0.7:
                h.pwrite(bytes([rng.randrange(256)]) * ln, off, fl)
            elif op < 0.85:
                h.zero(ln, off, fl)
            else:
                h.trim(ln, off, fl)
        h.flush()
        pc.check(p.ctl("SEAL") == "OK %d" % cycle, "%s: cycle %d sealed"
                 % (name, cycle))
    # Leave writes in the open segment, then crash.
    for _ in range(10):
        h.pwrite(b"\x5a" * 4096, rng.randrange(0, 256) * 4096)
    p.kill()
    return d


def logmut(a, args):
    r = subprocess.run([a.logmut] + [str(x) for x in args],
                       capture_output=True, text=True)
    sys.stderr.write(r.stderr[-2000:])
    m = re.search(r"tried (\d+) detected (\d+) inert (\d+) applied (\d+)",
                  r.stdout)
    if not m or r.returncode not in (0, 1):
        pc.check(False, "logmut %s ran: %s %s" % (args[:2], r.stdout,
                                                   r.stderr))
        return (0, 0, 0, 1)
    print(r.stdout.strip())
    return tuple(int(x) for x in m.groups())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugin", required=True)
    ap.add_argument("--logmut", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    a.threads = 16
    rng = random.Random(a.seed)
    tot = [0, 0, 0, 0]
    files = 0
    for name, extra in (("ref", []), ("data", ["log=data"])):
        d = make_log(a, a.dir, name, extra, rng)
        # A replica that is not zeroes, so zero and trim records show.
        with open(d.replica, "wb") as f:
            f.write(bytes(rng.randrange(256) for _ in range(4096)) * 256)
        for fn in sorted(os.listdir(d.logdir)):
            if not re.match(r"\d{20}\.(log|open|pre)$", fn):
                continue
            files += 1
            seed = rng.randrange(1 << 62)
            res = logmut(a, ["seg", os.path.join(d.logdir, fn), a.n, seed,
                             d.disk])
            tot = [x + y for x, y in zip(tot, res)]
            if fn.endswith(".log"):
                res = logmut(a, ["cycle", d.logdir, int(fn[:20]), d.disk,
                                 d.replica, a.n, seed])
                tot = [x + y for x, y in zip(tot, res)]
    print("TOTAL inputs %d mutations tried %d detected %d inert %d "
          "applied %d" % (files, *tot))
    pc.check(files >= 10, "segments, preserve files and an open segment "
             "were made (%d)" % files)
    pc.check(tot[3] == 0, "no mutation applied")
    pc.check(tot[1] + tot[2] == tot[0], "every mutation detected or inert")
    return 1 if pc.FAILS else 0


import nbd  # noqa: E402  (after pc, which checks python3-libnbd)

if __name__ == "__main__":
    sys.exit(main())
