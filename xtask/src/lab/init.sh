#!/bin/sh
# PID 1 of the lab's L1 Linux: loads the modules, mounts the 9p shares, brings up QEMU's
# user network, runs /lab/cmd.sh and reports its exit status between markers that
# xtask/src/lab/console.rs parses. /lab/env (per run) sets LAB_TOKEN and LAB_PATH, and
# LAB_RUNTIMES=1 with LAB_RUNTIMES_MODULES to run the command in a Debian root with the
# container engines (/lab/runtimes.sh).
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
# The archive has no /dev/console node, so the kernel started us without stdio.
exec </dev/null >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# What udev makes on a normal system: without them `/dev/stdout` (QEMU's chardev paths in the
# bench) would be created as a plain file on the devtmpfs instead of naming the pipe.
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
# The stall watch (xtask/src/lab/stall.rs) types a newline on this console when L1 idles
# with its timer interrupt lost. Setting the clock (a second ahead of itself) makes the
# kernel reprogram every CPU's timer (clock_was_set -> retrigger_next_event); the idle loop
# alone never does once the lost expiry has passed, so key presses and wake-ups do not help.
(while read -r _; do date -s "@$(($(date +%s) + 1))" >/dev/null 2>&1; done </dev/console) &
. /lab/env

fail() {
    dmesg | tail -n 20
    echo "@@lab:$LAB_TOKEN:error:$*@@"
    poweroff -f
}

while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
done </lib/modules/order
[ -c /dev/kvm ] || fail "/dev/kvm is missing after loading kvm-amd (no nested SVM?)"

# cache=loose: nothing changes the shared trees during a run, and caching makes programs
# load from /host several times faster under TCG.
share() {
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose "$1" "$2" ||
        fail "cannot mount the 9p share $1 at $2"
}
share src /src
share host /host

# Hold one idle KVM VM for L1's lifetime (Debian's QEMU from /host, no CPUs). Creating
# and destroying VMs flips the preempt-notifier static key, and TCG sometimes keeps
# executing the int3 that live-patching put in __schedule: L1 livelocks in exc_int3 (seen
# at about one run in 15-60). With the key held on, that site is never patched again.
host_lib=/host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu
/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path "$host_lib" \
    /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu -M none -accel kvm \
    -nodefaults -display none -monitor none -serial none >/dev/null 2>&1 &

# The scratch disk (an empty ext4 per run): katalite's cache (root's default,
# /var/lib/katalite) and temporary files live there, not in L1's RAM.
mkdir -p /scratch /var/lib
mount -t ext4 /dev/vda /scratch || fail "cannot mount the scratch disk"
mkdir -p /scratch/katalite /scratch/tmp && chmod 1777 /scratch/tmp
ln -s /scratch/katalite /var/lib/katalite

hostname lab
ip link set lo up
ip addr add 10.0.3.15/24 dev eth0 && ip link set eth0 up &&
    ip route add default via 10.0.3.2 || fail "cannot configure eth0"
echo "nameserver 10.0.3.3" >/etc/resolv.conf

if [ "$LAB_RUNTIMES" = 1 ]; then
    . /lab/runtimes.sh
    mkdir -p "$debian/lab" && cp /lab/cmd.sh "$debian/lab/cmd.sh" ||
        fail "cannot copy the command into the Debian root"
    echo "@@lab:$LAB_TOKEN:start@@"
    in_debian sh -c 'cd /src && exec sh /lab/cmd.sh'
    echo "@@lab:$LAB_TOKEN:exit:$?@@"
    poweroff -f
fi

export PATH="$LAB_PATH:/bin" HOME=/root TMPDIR=/scratch/tmp
cd /src || fail "cannot enter /src"
echo "@@lab:$LAB_TOKEN:start@@"
sh /lab/cmd.sh
echo "@@lab:$LAB_TOKEN:exit:$?@@"
poweroff -f
