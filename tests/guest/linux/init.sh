#!/bin/sh
# /init of the vmreplica Linux test guest (busybox sh); build.sh puts it into
# initrd.img.  See README.md for what it prints and the kernel parameters:
#   vrlimit=N  stop after writing seq N (default 1000000)
#   vrsync=0   do not sync before each "seq N" console line (default 1)
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/virtio-ports /run /tmp

# Everything this script and its children print goes to the serial port.
CON=/dev/ttyS0
[ -c "$CON" ] || CON=/dev/console
exec </dev/null >"$CON" 2>&1
# Plain LF line ends for our lines (the kernel's own messages keep CR LF).
stty -onlcr <"$CON" 2>/dev/null

off() {
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}

echo "vmreplica linux guest"

limit=1000000
dosync=1
for a in $(cat /proc/cmdline); do
    case $a in
    vrlimit=*) limit=${a#vrlimit=} ;;
    vrsync=*) dosync=${a#vrsync=} ;;
    esac
done
case $limit in '' | *[!0-9]*) echo "bad vrlimit '$limit'"; limit=1000000 ;; esac

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || echo "insmod $m failed"
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done
mkdir -p /data
if ! mount -t ext4 /dev/vda /data; then
    echo "mount failed"
    off
fi

# The agent's port: /dev/vportNpM whose name is org.qemu.guest_agent.0 (the
# name arrives from the host a little after the driver binds).
port=
i=0
while [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] && [ "$(cat "$p/name")" = org.qemu.guest_agent.0 ] &&
            port=/dev/${p##*/}
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    port=
    sleep 0.1
    i=$((i + 1))
done
qga=
if [ -n "$port" ]; then
    ln -sf "$port" /dev/virtio-ports/org.qemu.guest_agent.0
    # Not -d: it stays our child and logs its errors to the console.  The
    # state dir and pid file live on the initramfs (/run), never on /data.
    qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid &
    qga=$!
    # Ready once it holds the port open.
    i=0
    while [ $i -lt 200 ] && [ -d "/proc/$qga" ]; do
        for f in /proc/$qga/fd/*; do
            [ "$(readlink "$f")" = "$port" ] && break 2
        done
        sleep 0.05
        i=$((i + 1))
    done
    if [ -d "/proc/$qga" ] && [ $i -lt 200 ]; then
        echo "agent ready"
    else
        echo "agent failed"
    fi
else
    echo "agent port not found"
fi

# The application: "seq N" lines in /data/app.log, N in /data/counter
# (written to a temporary file and renamed); it continues from the counter
# a previous run left.  "seq N" on the console every 10 lines means, with
# vrsync=1, that lines up to N are on the disk (synced just before).
n=0
[ -r /data/counter ] && read -r n </data/counter
case $n in '' | *[!0-9]*) n=0 ;; esac
echo "app start after seq $n, limit $limit"
while [ ! -e /data/stop ] && [ "$n" -lt "$limit" ]; do
    n=$((n + 1))
    if ! echo "seq $n" >>/data/app.log ||
        ! echo "$n" >/data/counter.tmp ||
        ! mv -f /data/counter.tmp /data/counter; then
        echo "write failed at seq $n"
        break
    fi
    if [ $((n % 10)) -eq 0 ]; then
        [ "$dosync" = 0 ] || sync
        echo "seq $n"
    fi
    sleep 0.2
done
echo "app stopped at seq $n"
sync
[ -n "$qga" ] && kill "$qga" 2>/dev/null && sleep 0.2
if ! umount /data; then
    echo "umount failed"
    mount -o remount,ro /data
fi
echo "done"
off
