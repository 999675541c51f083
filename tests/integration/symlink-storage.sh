#!/bin/bash
# symlink-storage: symbolic links planted in a Replica server's storage
# location while VMs replicate are refused, never followed (issue #9,
# defect 7; docs/security.md "Storage paths").
#
# Someone who can write beneath the storage location (here: the test
# itself, as a local attacker would) replaces, after initial replication,
# a path the Replica server is about to use with a symbolic link to a file
# or directory outside the storage location.  One VM per case:
#
#   disk     STORAGE/UUID/disk0.raw     -> a file outside
#   staging  STORAGE/UUID/staging/cycle-N.tmp, for the next cycles,
#            pre-created as links -> a file outside
#   undo     STORAGE/UUID/undo (recovery history on) -> a directory outside
#   capture  STORAGE/UUID/undo/N-N.undo (the next cycle's capture file)
#            -> a file outside
#   middle   STORAGE/UUID itself -> a copy of it outside (a middle
#            component of every path the server opens)
#
# For each, the primary then writes: the Replica server must refuse (the
# Replica VM goes to state Error with "refused: a symbolic link" and the
# path in its last error, or the upload is refused with that message in an
# audit event), and what the link points at must be unchanged byte for
# byte (sha256 of every file, and the listing of a directory).
# SYMLINK_CASES="disk capture" runs only those cases.
source "$(dirname "$0")/functions.sh"
requires qemu-io jq curl openssl nbdkit sha256sum find
requires_build

setup_pair
STORAGE=$TESTDIR/replica-storage
OUTSIDE=$TESTDIR/outside
mkdir -p "$OUTSIDE"

# fingerprint PATH — sha256 of every file under PATH (or of PATH) with its
# name, and every name: what must not change.
fingerprint() {
    (cd "$1" 2>/dev/null && find . -type f -exec sha256sum {} + | sort &&
        find . | sort) || sha256sum <"$1"
}

# new_vm NAME [ENABLE-ARGS…] — a 4 MiB VM replicating every second, initial
# replication done and one cycle applied.  Sets VMDIR (STORAGE/UUID on
# the Replica server) and URI (the primary's disk).
new_vm() {
    local vm=$1
    shift
    create_vm "$vm" 4M
    URI=$(nbd_uri primary "$vm")
    qemu-io -f raw "$URI" -c 'write -P 0x11 0 64k' >/dev/null
    enable_replication "$vm" --frequency 1s "$@"
    qemu-io -f raw "$URI" -c 'write -P 0x22 0 64k' >/dev/null
    wait_converged "$vm" 60
    VMDIR=$(dirname "$(disk_path replica "$vm")")
    [ "$(dirname "$VMDIR")" = "$STORAGE" ] ||
        fail "$vm: replica disk not in $STORAGE: $VMDIR"
}

# settle VM — after a suspend: the Replica server has applied all it got.
_settled() {
    [ "$(repl replica "$1" applied_cycle)" = "$(repl replica "$1" last_cycle)" ]
}
settle() {
    wait_until 30 _settled "$1" || fail "$1: the replica did not settle"
}

# outside_file NAME — a 64 KiB file of random bytes outside the storage.
outside_file() {
    head -c 65536 /dev/urandom >"$OUTSIDE/$1"
    echo "$OUTSIDE/$1"
}

# write_more — a write on the primary, so the next cycles carry data.
write_more() {
    qemu-io -f raw "$URI" -c "write -P 0x$1 0 64k" >/dev/null ||
        fail "qemu-io write on the primary"
}

# refused_apply VM PATH — the Replica VM goes to Error, its last error
# says the open of PATH was refused for a symbolic link.
_in_error() { repl_is replica "$1" state Error; }
refused_apply() {
    local vm=$1 path=$2 err
    wait_until 30 _in_error "$vm" ||
        fail "$vm: the Replica VM did not go to Error (state $(repl replica "$vm" state), last error: $(repl replica "$vm" last_error))"
    err=$(repl replica "$vm" last_error)
    [[ $err == *"$path: refused: a symbolic link"* ]] ||
        fail "$vm: last error does not refuse $path: '$err'"
    log "  $vm: refused: $err"
}

# _decided VM N — the Replica VM went to Error, or applied cycle N.
_decided() {
    _in_error "$1" || [ "$(repl replica "$1" applied_cycle)" -ge "$2" ]
}

# refused_upload VM PATH — an upload of VM was refused with an audit event
# saying PATH is a symbolic link (the primary keeps retrying).
_audit_names() {
    vrj replica events | jq -r '.events[] | select(.level == "audit") |
        .message' | grep -F -- "$1" | grep -qF -- "refused: a symbolic link"
}
refused_upload() {
    local vm=$1 path=$2
    wait_until 30 _audit_names "$path" ||
        fail "$vm: no audit event refusing $path (replica state $(repl replica "$vm" state), primary last error: $(repl primary "$vm" last_error))"
    log "  $vm: refused: $(vrj replica events | jq -r '.events[] |
        select(.level == "audit") | .message' | grep -F -- "$path" | tail -n 1)"
}

# kept WHAT BEFORE PATH — PATH's fingerprint is still BEFORE.
kept() {
    [ "$(fingerprint "$3")" = "$2" ] ||
        fail "$1: $3 outside the storage location was changed through the link"
}

# --- disk: STORAGE/UUID/disk0.raw -> a file outside --------------------------
case_disk() {
    new_vm sdisk
    # Suspended while the file is swapped: an apply between the rm and the
    # ln would meet no file at all (a CI flake: "No such file or directory").
    vr primary replication suspend sdisk >/dev/null
    settle sdisk
    victim=$(outside_file disk-victim)
    before=$(fingerprint "$victim")
    rm "$VMDIR/disk0.raw"
    ln -s "$victim" "$VMDIR/disk0.raw"
    vr primary replication resume sdisk >/dev/null
    write_more 33
    refused_apply sdisk "$VMDIR/disk0.raw"
    kept disk "$before" "$victim"
    vr primary replication suspend sdisk >/dev/null
}

# --- staging: the next cycles' temporaries pre-created as links --------------
case_staging() {
    new_vm sstage
    vr primary replication suspend sstage >/dev/null
    settle sstage
    next=$(($(repl replica sstage last_cycle) + 1))
    victim=$(outside_file stage-victim)
    before=$(fingerprint "$victim")
    for n in $(seq "$next" $((next + 40))); do
        ln -s "$victim" "$VMDIR/staging/cycle-$n.tmp"
    done
    vr primary replication resume sstage >/dev/null
    write_more 44
    refused_upload sstage "$VMDIR/staging/cycle-"
    kept staging "$before" "$victim"
    [ "$(repl replica sstage last_cycle)" -lt "$next" ] ||
        fail "staging: cycle $next was staged through a link"
    vr primary replication suspend sstage >/dev/null
}

# --- undo: STORAGE/UUID/undo -> a directory outside ----------------------------
case_undo() {
    new_vm sundo --recovery-history 2
    mkdir -p "$OUTSIDE/undo"
    head -c 4096 /dev/urandom >"$OUTSIDE/undo/keep.me"
    head -c 4096 /dev/urandom >"$OUTSIDE/undo/00000000000000000001-00000000000000000001.undo.tmp"
    before=$(fingerprint "$OUTSIDE/undo")
    vr primary replication suspend sundo >/dev/null # as for the disk
    settle sundo
    rm -rf "$VMDIR/undo"
    ln -s "$OUTSIDE/undo" "$VMDIR/undo"
    vr primary replication resume sundo >/dev/null
    write_more 55
    refused_apply sundo "$VMDIR/undo"
    kept undo "$before" "$OUTSIDE/undo"
    vr primary replication suspend sundo >/dev/null
}

# --- capture: the next cycle's undo file -> a file outside ---------------------
case_capture() {
    new_vm scapt --recovery-history 2
    vr primary replication suspend scapt >/dev/null
    settle scapt
    victim=$(outside_file capture-victim)
    before=$(fingerprint "$victim")
    next=$(($(repl replica scapt applied_cycle) + 1))
    for n in $(seq "$next" $((next + 40))); do
        ln -s "$victim" "$VMDIR/undo/$(printf '%020d-%020d.undo' "$n" "$n")"
    done
    vr primary replication resume scapt >/dev/null
    write_more 66
    wait_until 30 _decided scapt "$next" ||
        fail "capture: cycle $next neither applied nor refused"
    err=$(repl replica scapt last_error)
    [ "$(repl replica scapt state)" = Error ] &&
        [[ $err == *"$VMDIR/undo: undo: $(printf '%020d-%020d.undo' "$next" "$next") is a symbolic link"* ]] ||
        fail "capture: cycle $next applied over a capture file that is a link (state $(repl replica scapt state), applied $(repl replica scapt applied_cycle), last error '$err')"
    log "  scapt: refused: $err"
    kept capture "$before" "$victim"
    vr primary replication suspend scapt >/dev/null
}

# --- middle: STORAGE/UUID -> a copy of it outside -------------------------------
case_middle() {
    new_vm smid
    vr primary replication suspend smid >/dev/null
    settle smid
    cp -a "$VMDIR" "$OUTSIDE/vmcopy"
    before=$(fingerprint "$OUTSIDE/vmcopy")
    mv "$VMDIR" "$VMDIR.moved"
    ln -s "$OUTSIDE/vmcopy" "$VMDIR"
    vr primary replication resume smid >/dev/null
    write_more 77
    refused_upload smid "$VMDIR/staging"
    kept middle "$before" "$OUTSIDE/vmcopy"
    vr primary replication suspend smid >/dev/null
}

for c in ${SYMLINK_CASES:-disk staging undo capture middle}; do
    log "case $c"
    "case_$c"
done
log "PASS"
