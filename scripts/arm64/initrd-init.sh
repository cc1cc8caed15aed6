#!/bin/busybox sh
# /init of the initrd that scripts/arm64/vm.py builds: the Debian kernel has virtio-blk and ext4 as modules,
# so they are loaded here (in the order of /modules, dependencies first) before the root can be mounted.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
    echo "initrd: $*; powering off"
    echo o >/proc/sysrq-trigger
    sleep 60
}

mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

for module in $(cat /modules); do
    insmod "/lib/modules/$module" || fail "insmod $module failed"
done

root=/dev/vda
job=/dev/vdb
modules=/dev/vdc
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    root=*) root="${arg#root=}" ;;
    memcr.job=*) job="${arg#memcr.job=}" ;;
    memcr.modules=*) modules="${arg#memcr.modules=}" ;;
    esac
done

# the disks appear asynchronously after virtio_blk is loaded
tries=0
while [ ! -b "$root" ] || [ ! -b "$job" ] || [ ! -b "$modules" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 200 ] || fail "no $root, $job or $modules after 20 s"
    sleep 0.1
done

mount -t ext4 "$root" /newroot || fail "cannot mount $root"
mkdir -p /newroot/mnt/job
mount -t ext4 "$job" /newroot/mnt/job || fail "cannot mount $job"
# this kernel's modules (the root disk serves every kernel), for modprobe
mount -t ext4 -o ro "$modules" /newroot/usr/lib/modules || fail "cannot mount $modules"
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs"
done
# tini as PID 1 reaps the orphans that the tests leave to init, as a real init would
exec switch_root /newroot /usr/bin/tini -- /bin/sh /mnt/job/init.sh
