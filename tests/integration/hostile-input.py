#!/usr/bin/env python3
"""hostile-input.py — the hostile client of tests/integration/hostile-input.sh.

Crafts replication payloads (docs/formats.md §1.2 and §2) with any field
set to a hostile value, and speaks to the Replica server's certificate port
in ways curl cannot: an upload paused before its last byte (to see what the
server staged meanwhile), old TLS versions, plaintext, a slow client and
more connections than the server's cap.  Commands print one JSON object on
stdout (the client's local port included, so the test can find the audit
event naming it).

    payload OUT UUID [--base] [--cycle N] [--epoch E] [--ndisks N]
            [--rec KIND:OFFSET:LEN[:DATALEN[:BYTE]]]... [--seal COUNT]
    bomb UUID RECORDS MIB             raw base payload on stdout: RECORDS
                                      writes of MIB MiB of zeroes at 0
    crc-selftest
    paused-put PORT PKI PATH BODYFILE TMPGLOB [HEADER:VALUE]...
    tls-old PORT PKI VERSION          a handshake offering only TLS VERSION
                                      (1.0, 1.1, or 1.2 as the control)
    plaintext PORT
    slowloris PORT PKI UUID MAX_S
    flood PORT PKI HOLD
    hold-put PORT PKI PATH BODYFILE HOLD_BYTES GATE [HEADER:VALUE]...
                                      PUT the first HOLD_BYTES of BODYFILE,
                                      wait until the file GATE exists, send
                                      the rest and read the answer
    many-put PORT PKI HOLD_S PATH BODYFILE [PATH BODYFILE]... [-- HEADER:VALUE...]
                                      one connection per PATH at once, each
                                      sending all of its body but the last
                                      byte; after HOLD_S the last bytes, then
                                      the answers (a JSON list)
"""
import glob
import json
import os
import select
import socket
import ssl
import struct
import sys
import time
import uuid as uuidmod
import warnings

# TLS 1.0 and 1.1 are deprecated: offering them is the point here.
warnings.filterwarnings("ignore", category=DeprecationWarning)

# --- CRC-32C (Castagnoli, reflected 0x82F63B78) ----------------------------

_T = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _T.append(_c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _T[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# Appending a zero byte is linear in the CRC register over GF(2): a 32x32
# matrix (one column per bit), raised to the power n by squaring, extends a
# CRC over n zero bytes without touching them (as zlib's crc32_combine).
def _mat_apply(cols, v):
    r, i = 0, 0
    while v:
        if v & 1:
            r ^= cols[i]
        v >>= 1
        i += 1
    return r


def _mat_mul(a, b):
    return [_mat_apply(a, c) for c in b]


_ZERO1 = [_T[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]


def crc32c_zeros(crc, n):
    reg = crc ^ 0xFFFFFFFF
    m = _ZERO1
    while n:
        if n & 1:
            reg = _mat_apply(m, reg)
        n >>= 1
        if n:
            m = _mat_mul(m, m)
    return reg ^ 0xFFFFFFFF


# --- payloads ---------------------------------------------------------------

KINDS = {"write": 1, "zero": 2, "trim": 3, "seal": 4, "wref": 5}
F_BASE = 0x1


def cyc_header(u, flags, cycle, epoch, ndisks):
    h = struct.pack("<8sIIQQII16sI", b"VRCYCLE1", 1, flags, cycle, epoch,
                    ndisks, 0, uuidmod.UUID(u).bytes, 0)
    return h + struct.pack("<I", crc32c(h))


def rec_header(kind, disk, length, offset, seq, data=b"", zeros=0):
    """A 32-byte record header with its CRC over the header (CRC field 0)
    and the data: `data` bytes, or `zeros` zero bytes not materialised."""
    h = struct.pack("<IBBHIIQQ", 0x31525256, kind, 0, disk, length, 0,
                    offset, seq)
    c = crc32c(data, crc32c(h))
    if zeros:
        c = crc32c_zeros(c, zeros)
    return h[:12] + struct.pack("<I", c) + h[16:]


def cmd_payload(a):
    out, u = a[0], a[1]
    flags, cycle, epoch, ndisks, recs, seal = 0, 0, 1, 1, [], None
    i = 2
    while i < len(a):
        k = a[i]
        if k == "--base":
            flags |= F_BASE
            i += 1
            continue
        v = a[i + 1]
        i += 2
        if k == "--cycle":
            cycle = int(v)
        elif k == "--epoch":
            epoch = int(v)
        elif k == "--ndisks":
            ndisks = int(v, 0)
        elif k == "--rec":
            recs.append(v)
        elif k == "--seal":
            seal = int(v, 0)
        else:
            sys.exit("payload: unknown option " + k)
    body = cyc_header(u, flags, cycle, epoch, ndisks)
    seq = 0
    for r in recs:
        f = r.split(":")
        kind, off, ln = KINDS[f[0]], int(f[1], 0), int(f[2], 0)
        # The data actually sent may differ from the length claimed.
        dlen = int(f[3], 0) if len(f) > 3 else (ln if kind == 1 else 0)
        byte = int(f[4], 0) if len(f) > 4 else 0x5A
        data = bytes([byte]) * dlen
        body += rec_header(kind, 0, ln, off, seq, data) + data
        seq += 1
    body += rec_header(4, 0, 0, len(recs) if seal is None else seal, seq)
    with open(out, "wb") as f:
        f.write(body)


def cmd_bomb(a):
    u, n, mib = a[0], int(a[1]), int(a[2])
    w = sys.stdout.buffer
    w.write(cyc_header(u, F_BASE, 0, 1, 1))
    zero = bytes(1 << 20)
    for seq in range(n):
        w.write(rec_header(1, 0, mib << 20, 0, seq, zeros=mib << 20))
        for _ in range(mib):
            w.write(zero)
    w.write(rec_header(4, 0, 0, n, n))
    w.flush()


def cmd_crc_selftest(_a):
    assert crc32c(b"123456789") == 0xE3069283
    for n in (0, 1, 7, 4096, 100003):
        base = crc32c(b"prefix")
        assert crc32c_zeros(base, n) == crc32c(bytes(n), base), n
    print(json.dumps({"ok": True}))


# --- connections --------------------------------------------------------------

HOST = "replica.test.local"


def tls_ctx(pki, cert="primary", lo=None, hi=None, seclevel0=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(pki, "ca.pem"))
    ctx.load_cert_chain(os.path.join(pki, cert + ".pem"),
                        os.path.join(pki, cert + ".key"))
    if seclevel0:
        ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    if lo:
        ctx.minimum_version = lo
    if hi:
        ctx.maximum_version = hi
    return ctx


def connect(port, timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s, s.getsockname()[1]


LAST_HEADERS = {}  # of the last response read_response read


def read_response(ss, deadline_s=30):
    """Read one HTTP response; returns (code, body text)."""
    ss.settimeout(deadline_s)
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = ss.recv(65536)
        if not d:
            break
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    LAST_HEADERS.clear()
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        LAST_HEADERS[k.strip().lower()] = v.strip()
    code = int(lines[0].split()[1]) if lines and lines[0].startswith(
        "HTTP/") else 0
    clen = None
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        if k.strip().lower() == "content-length":
            clen = int(v.strip())
    while clen is not None and len(body) < clen:
        d = ss.recv(65536)
        if not d:
            break
        body += d
    return code, body.decode("utf-8", "replace")


def cmd_paused_put(a):
    """PUT BODYFILE to PATH, all but one byte (Content-Length counts one
    more), wait until the server's staging file stops growing, note its
    largest size, then send the last byte and read the answer."""
    port, pki, path, bodyfile, tmpglob = int(a[0]), a[1], a[2], a[3], a[4]
    extra = a[5:]
    body = open(bodyfile, "rb").read()
    s, lport = connect(port)
    ss = tls_ctx(pki).wrap_socket(s, server_hostname=HOST)
    hdr = "PUT %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n" \
          "Content-Type: application/octet-stream\r\n" \
          "Content-Length: %d\r\n" % (path, HOST, port, len(body) + 1)
    for h in extra:
        k, _, v = h.partition(":")
        hdr += "%s: %s\r\n" % (k, v)
    ss.sendall(hdr.encode() + b"\r\n" + body)
    peak, last_change, t0 = 0, time.monotonic(), time.monotonic()
    while time.monotonic() - last_change < 1.5 and time.monotonic() - t0 < 20:
        size = 0
        for p in glob.glob(tmpglob):
            try:
                size = max(size, os.stat(p).st_size)
            except FileNotFoundError:
                pass
        if size > peak:
            peak, last_change = size, time.monotonic()
        time.sleep(0.05)
    ss.sendall(b"\0")
    code, text = read_response(ss)
    print(json.dumps({"code": code, "body": text, "local_port": lport,
                      "tmp_peak_bytes": peak}))


def cmd_tls_old(a):
    port, pki, ver = int(a[0]), a[1], a[2]
    v = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
         "1.2": ssl.TLSVersion.TLSv1_2}[ver]
    ctx = tls_ctx(pki, lo=v, hi=v, seclevel0=True)
    s, lport = connect(port)
    res = {"local_port": lport}
    try:
        ss = ctx.wrap_socket(s, server_hostname=HOST)
        res["handshake"] = "ok"
        res["version"] = ss.version()
        ss.close()
    except (ssl.SSLError, OSError) as e:
        res["handshake"] = "failed"
        res["error"] = str(e)
    print(json.dumps(res))


def cmd_plaintext(a):
    port = int(a[0])
    s, lport = connect(port)
    s.sendall(b"GET /r1/vms/ HTTP/1.1\r\nHost: replica.test.local\r\n"
              b"X-Vmreplica-Epoch: 1\r\n\r\n")
    got, closed, t0 = b"", False, time.monotonic()
    s.settimeout(1)
    while time.monotonic() - t0 < 10:
        try:
            d = s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            closed = True
            break
        if not d:
            closed = True
            break
        got += d
    print(json.dumps({"local_port": lport, "closed": closed,
                      "seconds": round(time.monotonic() - t0, 2),
                      "received_hex": got[:64].hex(),
                      "http_answer": got.startswith(b"HTTP/")}))


def cmd_slowloris(a):
    """TLS handshake, then one byte of a request header per second until
    the server closes the connection or MAX_S pass."""
    port, pki, u, max_s = int(a[0]), a[1], a[2], float(a[3])
    s, lport = connect(port)
    ss = tls_ctx(pki).wrap_socket(s, server_hostname=HOST)
    req = ("GET /r1/vms/%s HTTP/1.1\r\nHost: %s\r\nX-Vmreplica-Epoch: 1\r\n"
           "X-Padding: %s\r\n\r\n" % (u, HOST, "p" * 200)).encode()
    t0 = time.monotonic()
    sent, closed, answer = 0, None, b""
    while time.monotonic() - t0 < max_s and sent < len(req):
        try:
            ss.sendall(req[sent:sent + 1])
            sent += 1
        except OSError:
            closed = time.monotonic() - t0
            break
        end = time.monotonic() + 1
        while closed is None and time.monotonic() < end:
            r, _, _ = select.select([ss], [], [], end - time.monotonic())
            if not r:
                continue
            try:
                d = ss.recv(4096)
            except (ssl.SSLError, OSError):
                d = b""
            if not d:
                closed = time.monotonic() - t0
            else:
                answer += d
        if closed is not None:
            break
    print(json.dumps({"local_port": lport, "bytes_sent": sent,
                      "closed_after_s": None if closed is None
                      else round(closed, 2),
                      "answer": answer[:200].decode("latin-1")}))


def cmd_flood(a):
    """Hold HOLD connections open (TCP only), then open one more and try a
    TLS handshake on it."""
    port, pki, hold = int(a[0]), a[1], int(a[2])
    held = [connect(port)[0] for _ in range(hold)]
    time.sleep(0.5)
    s, lport = connect(port)
    t0 = time.monotonic()
    res = {"local_port": lport}
    try:
        ss = tls_ctx(pki).wrap_socket(s, server_hostname=HOST)
        ss.settimeout(5)
        ss.sendall(b"GET /r1/vms/ HTTP/1.1\r\nHost: replica.test.local\r\n"
                   b"X-Vmreplica-Epoch: 1\r\n\r\n")
        d = ss.recv(4096)
        res["extra"] = "answered" if d else "closed after handshake"
        res["answer"] = d[:100].decode("latin-1")
    except (ssl.SSLError, OSError) as e:
        res["extra"] = "refused"
        res["error"] = str(e)
    res["seconds"] = round(time.monotonic() - t0, 2)
    # The held connections must still be open: the cap refuses the extra
    # connection, not the ones it already has.
    still = 0
    for h in held:
        r, _, _ = select.select([h], [], [], 0)
        if not r:
            still += 1
        else:
            try:
                h.setblocking(False)
                still += 1 if h.recv(1, socket.MSG_PEEK) else 0
            except OSError:
                pass
    res["held_still_open"] = still
    for h in held:
        h.close()
    print(json.dumps(res))


def put_header(path, port, length, extra):
    hdr = "PUT %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n" \
          "Content-Type: application/octet-stream\r\n" \
          "Content-Length: %d\r\n" % (path, HOST, port, length)
    for h in extra:
        k, _, v = h.partition(":")
        hdr += "%s: %s\r\n" % (k, v)
    return hdr.encode() + b"\r\n"


def answer(ss, lport):
    try:
        code, text = read_response(ss, 60)
    except (OSError, ssl.SSLError) as e:
        code, text = 0, str(e)
    return {"code": code, "body": text, "local_port": lport,
            "retry_after": LAST_HEADERS.get("retry-after")}


def cmd_hold_put(a):
    port, pki, path, bodyfile = int(a[0]), a[1], a[2], a[3]
    hold, gate, extra = int(a[4]), a[5], a[6:]
    body = open(bodyfile, "rb").read()
    s, lport = connect(port, timeout=90)
    ss = tls_ctx(pki).wrap_socket(s, server_hostname=HOST)
    ss.sendall(put_header(path, port, len(body), extra) + body[:hold])
    t0 = time.monotonic()
    while not os.path.exists(gate) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    ss.sendall(body[hold:])
    print(json.dumps(answer(ss, lport)))


def cmd_many_put(a):
    port, pki, hold_s = int(a[0]), a[1], float(a[2])
    rest, extra = a[3:], []
    if "--" in rest:
        i = rest.index("--")
        rest, extra = rest[:i], rest[i + 1:]
    conns = []
    for path, bodyfile in zip(rest[0::2], rest[1::2]):
        body = open(bodyfile, "rb").read()
        s, lport = connect(port, timeout=90)
        ss = tls_ctx(pki).wrap_socket(s, server_hostname=HOST)
        ss.sendall(put_header(path, port, len(body), extra) + body[:-1])
        conns.append((ss, lport, body[-1:]))
    time.sleep(hold_s)
    for ss, _, last in conns:
        try:
            ss.sendall(last)
        except OSError:
            pass
    print(json.dumps([answer(ss, lport) for ss, lport, _ in conns]))


CMDS = {"payload": cmd_payload, "bomb": cmd_bomb,
        "crc-selftest": cmd_crc_selftest, "paused-put": cmd_paused_put,
        "tls-old": cmd_tls_old, "plaintext": cmd_plaintext,
        "slowloris": cmd_slowloris, "flood": cmd_flood,
        "hold-put": cmd_hold_put, "many-put": cmd_many_put}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CMDS:
        sys.exit(__doc__)
    CMDS[sys.argv[1]](sys.argv[2:])
