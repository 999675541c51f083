# shellcheck shell=bash
# bench/lib.sh — shared by the rows of bench/run (sourced after
# tests/integration/functions.sh, whose daemons, PKI and clean-up they use).
#
# A row prints one line per figure on stdout:
#     RESULT<TAB>figure<TAB>ours<TAB>peer<TAB>ratio<TAB>target<TAB>met
# and anything else on stderr.  BENCH_SMOKE=1: tiny sizes, one round (CI:
# the suite must not rot); BENCH_ROUNDS overrides the rounds.

SMOKE=${BENCH_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    ROUNDS=${BENCH_ROUNDS:-1}
else
    ROUNDS=${BENCH_ROUNDS:-3}
fi

# now_ms — the time in milliseconds.
now_ms() {
    date +%s%3N
}

# median N… — the median of integers (the lower one of an even count).
median() {
    printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'
}

# ratio A B — A / B with two decimals ("-" if B is 0).
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'
}

# result FIGURE OURS PEER RATIO TARGET MET — one line of the table.
result() {
    printf 'RESULT\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@"
}

# met_le RATIO LIMIT / met_ge RATIO LIMIT — "met" or "not met".
met_le() { awk -v r="$1" -v l="$2" 'BEGIN { print (r != "-" && r <= l) ? "met" : "not met" }'; }
met_ge() { awk -v r="$1" -v l="$2" 'BEGIN { print (r != "-" && r >= l) ? "met" : "not met" }'; }

# bench_converged VM TIMEOUT — wait_converged (nothing pending on the
# primary, the replica's applied cycle at the primary's last) from one
# process asking both daemons' API sockets every 20 ms.  wait_converged
# runs three CLI calls and three jq a poll, every 200 ms: about a sixth of
# a CPU here, taken from the side being measured (the peer has no such
# poll), and up to 200 ms late.
bench_converged() {
    python3 - "$(api_sock "$SRC")" "$(api_sock "$DST")" "$1" "$2" <<'EOF' ||
import http.client, json, socket, sys, time
src, dst, vm, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.unix_path)
def get(path, url):
    c = Unix(path)
    try:
        c.request("GET", url)
        r = c.getresponse()
        body = r.read()
        return json.loads(body) if r.status == 200 else None
    except OSError:
        return None
    finally:
        c.close()
end = time.monotonic() + timeout
while time.monotonic() < end:
    m = get(src, "/v1/vms/%s/replication/measure" % vm)
    p = get(src, "/v1/vms/%s/replication" % vm)
    r = get(dst, "/v1/vms/%s/replication" % vm)
    if m and p and r and m.get("pending_size") == 0 and \
            isinstance(r.get("applied_cycle"), int) and \
            isinstance(p.get("last_cycle"), int) and \
            r["applied_cycle"] >= p["last_cycle"]:
        sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
EOF
        fail "vm $1: replica did not converge within $2 s"
}

# vmlike FILE SIZE DATA SEED — a sparse raw image of SIZE bytes holding
# DATA bytes of VM-like content in 1 MiB extents spread over it: a third
# text (words and numbers), a third random (binaries), a third mostly
# zeroes with scattered bytes (tables, sparse files).
vmlike() {
    python3 - "$@" <<'EOF'
import random, sys
path, size, data, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
MiB = 1 << 20
n = data // MiB
slots = size // MiB
step = max(1, slots // max(1, n))
words = [b"kernel", b"module", b"config", b"replica", b"cycle", b"disk", b"sector",
         b"the", b"and", b"of", b"return", b"static", b"int", b"void", b"char"]
# Text extents are drawn from a pool of lines (a Python loop per word made
# 1 GiB take half a minute), each extent its own random sequence of them.
lines = [rnd.choice(words) + b" " + str(rnd.randrange(100000)).encode() + b"\n"
         for _ in range(1 << 16)]
with open(path, "wb") as f:
    f.truncate(size)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            buf = b"".join(rnd.choices(lines, k=MiB // 9))[:MiB]
            buf += b"\n" * (MiB - len(buf))
        elif kind == 1:
            buf = rnd.randbytes(MiB)
        else:
            b = bytearray(MiB)
            for _ in range(2048):
                b[rnd.randrange(MiB)] = rnd.randrange(256)
            buf = bytes(b)
        f.seek((i * step % slots) * MiB)
        f.write(buf)
EOF
}

# size_of SPEC — bytes of 64M, 2G, 1T…
size_of() {
    numfmt --from=iec "$1"
}

# bench_pki — before setup_pair: use the PKI bench/run made once for all
# rows (BENCH_PKI) instead of making one per row.
bench_pki() {
    [ -n "${BENCH_PKI:-}" ] && [ -e "$BENCH_PKI/ca.pem" ] || return 0
    [ -e "$PKI/ca.pem" ] || cp -a "$BENCH_PKI" "$PKI"
}

# cpu_ms PID — CPU time (user + system, ms) of PID, of its children it
# has waited for, and of its children still running (and theirs).
cpu_ms() {
    local hz
    hz=$(getconf CLK_TCK)
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" -v hz="$hz" '
        { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
          # f[2] ppid; f[12..15] utime stime cutime cstime
          ppid[pid] = f[2]; t[pid] = f[12] + f[13] + f[14] + f[15] }
        END { want[root] = 1
              for (changed = 1; changed; ) { changed = 0
                  for (p in ppid) if (!(p in want) && (ppid[p] in want)) { want[p] = 1; changed = 1 } }
              for (p in want) sum += t[p]
              printf "%.0f\n", sum * 1000 / hz }'
}
