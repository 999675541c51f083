#!/bin/bash
# web-dashboard: the dashboard of --web-listen in a real headless Chromium.
#
# A replicating pair with two VMs; the primary's web listener (HTTPS with
# client certificates) is reached through a small TLS-terminating reverse
# proxy (web-proxy.py), since headless Chromium cannot present a client
# certificate on its own.  Chromium's rendered DOM (--dump-dom, after the
# page's fetch() calls ran) lists both VMs with mode, state and health and
# the selected VM's charts; after `replication suspend web2`, a new dump
# shows web2 Suspended.  A screenshot is taken (SCREENSHOT_DIR=DIR keeps
# it, as docs/dashboard.png was made).
source "$(dirname "$0")/functions.sh"
requires jq curl openssl nbdkit python3 chromium
requires_build

CHROME=(chromium --headless=new --no-sandbox --disable-gpu
    --disable-dev-shm-usage --no-first-run --user-data-dir="$TESTDIR/chrome"
    --virtual-time-budget=5000)
dump() { # URL — the DOM after the page's scripts ran
    timeout 60 "${CHROME[@]}" --dump-dom "$1" 2>>"$TESTDIR/chrome.log"
}

setup_pair
create_vm web1 64M
create_vm web2 64M
enable_replication web1 --frequency 1s
enable_replication web2 --frequency 1s
WS=$(free_port)
vr primary server set --web-listen "127.0.0.1:$WS" >/dev/null ||
    fail "primary: --web-listen"
PP=$(free_port)
python3 "$(dirname "$0")/web-proxy.py" "$PP" "https://127.0.0.1:$WS" \
    "$PKI/ca.pem" "$PKI/replica.pem" "$PKI/replica.key" \
    >>"$TESTDIR/proxy.log" 2>&1 &
wait_until 10 port_open "$PP" || fail "proxy not listening"
URL="http://127.0.0.1:$PP/"
wait_until 30 repl_is primary web2 health Normal || fail "web2 not Normal"

row() { # DOM VM — the VM's table row, one line
    tr -d '\n' <"$1" | grep -o "<tr[^>]*id=\"vm-$2\"[^>]*>.*" | sed 's|</tr>.*||'
}
log "the dashboard lists the VMs"
dump "$URL" >"$TESTDIR/dom1.html" || fail "chromium --dump-dom failed"
for vm in web1 web2; do
    r=$(row "$TESTDIR/dom1.html" $vm)
    [ -n "$r" ] || fail "no row for $vm in the DOM: $(head -c 2000 "$TESTDIR/dom1.html")"
    for cell in "<td class=\"name\">$vm</td>" '<td class="mode">primary</td>' \
        '<td class="state">Replicating</td>' '<td class="health">Normal</td>'; do
        grep -qF "$cell" <<<"$r" || fail "$vm row lacks $cell: $r"
    done
done
grep -q '<polyline class="line"\|no samples yet' "$TESTDIR/dom1.html" ||
    fail "no lag chart"
grep -q 'id="events"><li' "$TESTDIR/dom1.html" || fail "no events listed"

log "it follows a state change"
vr primary replication suspend web2 >/dev/null || fail "suspend web2"
dump "$URL" >"$TESTDIR/dom2.html" || fail "chromium --dump-dom failed"
grep -qF '<td class="state">Suspended</td>' <<<"$(row "$TESTDIR/dom2.html" web2)" ||
    fail "web2 not Suspended in the DOM: $(row "$TESTDIR/dom2.html" web2)"
grep -qF '<td class="state">Replicating</td>' <<<"$(row "$TESTDIR/dom2.html" web1)" ||
    fail "web1 changed: $(row "$TESTDIR/dom2.html" web1)"

log "a screenshot"
timeout 60 "${CHROME[@]}" --window-size=1280,800 \
    --screenshot="$TESTDIR/dashboard.png" "$URL" 2>>"$TESTDIR/chrome.log" ||
    fail "chromium --screenshot failed"
[ "$(head -c 8 "$TESTDIR/dashboard.png" | od -An -tx1 | tr -d ' ')" = \
    89504e470d0a1a0a ] || fail "the screenshot is not a PNG"
[ -z "${SCREENSHOT_DIR:-}" ] || cp "$TESTDIR/dashboard.png" "$SCREENSHOT_DIR/"
log "ok"
