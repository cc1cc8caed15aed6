#!/bin/sh
# The arm64 test machine's init (scripts/arm64/vm.py), run by tini as PID 1 from the job disk at /mnt/job:
# sets the system up as a booted Debian host has it, runs the job as root, then prints the marker line
# with its exit code that vm.py waits for and powers off.
job=/mnt/job
# NONCE, VM_HOSTNAME, SYSCTLS ("name=value ..." from the host)
. "$job/vm.env"

off() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 60
}

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /run
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
# devtmpfs lacks the links that udev or systemd would add
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# /tmp stays on the disk, as on the host: the tests write dumps of up to 1 GiB there, too much for a
# tmpfs in 4 GiB next to the targets themselves
chmod 1777 /tmp
hostname "$VM_HOSTNAME"
ip link set lo up

# the host's settings where they differ from this kernel's defaults, so the tests see the same rules
for setting in $SYSCTLS; do
    file="/proc/sys/${setting%%=*}"
    [ -w "$file" ] || continue
    old=$(cat "$file")
    [ "$old" = "${setting#*=}" ] && continue
    echo "${setting#*=}" >"$file" && echo "memcr-vm: ${setting%%=*}: $old -> ${setting#*=} (as on the host)"
done

mkdir -p /opt/memcr-py
mount --bind "$job/project" /opt/memcr-py
cd /opt/memcr-py || off

echo "memcr-vm: start $NONCE"
env -i PATH=/opt/memcr-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root USER=root LOGNAME=root SHELL=/bin/sh LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1 \
    /bin/sh "$job/run" </dev/null 2>&1
echo "memcr-vm: exit $NONCE $?"
off
