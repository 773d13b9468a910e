# Sourced by the lab's init (init.sh) when the run asks for the container engines (`lab run
# --runtimes`, xtask/src/lab/runtimes.rs). Builds a Debian root at $debian: an overlay of
# the 9p share `runtimes` (the engines' packages, unpacked on the host) over the host's
# root, written on the scratch disk; loads the engines' modules, starts containerd and
# dockerd there and defines `in_debian`, which runs a command in that root.
debian=/scratch/debian

# PATH ends with L1's busybox applets (/lab/busybox): what the plain lab offers and Debian
# lacks (tunctl, httpd, ...) stays there for commands written for the plain lab.
in_debian() {
    chroot "$debian" /usr/bin/env -i HOME=/root TERM=linux TMPDIR=/tmp \
        PATH="$LAB_PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/lab/busybox" \
        "$@"
}

uptime_s() {
    read -r up _ </proc/uptime
    echo "${up%.*}"
}

# Waits up to $1 s for daemon $2 until `$3...` (run in the Debian root) succeeds; shows
# the daemon's log (/var/log/$2.log) on failure.
wait_for() {
    limit=$1 daemon=$2 && shift 2
    began=$(uptime_s)
    until in_debian "$@" >/dev/null 2>&1; do
        if [ $(($(uptime_s) - began)) -ge "$limit" ]; then
            tail -n 30 "$debian/var/log/$daemon.log"
            fail "$daemon: '$*' did not answer within $limit s (log: /var/log/$daemon.log)"
        fi
        sleep 1
    done
    echo "lab: $daemon ready after $(($(uptime_s) - began)) s (L1 up $(uptime_s) s)" |
        tee -a "$debian/var/log/lab.log"
}

share runtimes /runtimes
mkdir -p /scratch/overlay/upper /scratch/overlay/work "$debian"
mount -t overlay overlay \
    -o lowerdir=/runtimes:/host,upperdir=/scratch/overlay/upper,workdir=/scratch/overlay/work \
    "$debian" || fail "cannot mount the Debian root (overlay of /runtimes and /host)"

# What a booted Debian has mounted. /host stays reachable for LAB_PATH and the kernel
# modules (runtimes.rs links them there), /src and /scratch keep their paths. The engines'
# state dirs are on the scratch disk: overlayfs cannot be their storage drivers' upper layer.
mount -t proc proc "$debian/proc" &&
    mount -t sysfs sysfs "$debian/sys" &&
    mount -t cgroup2 cgroup2 "$debian/sys/fs/cgroup" &&
    mount -o rbind /dev "$debian/dev" &&
    mount -t tmpfs -o mode=0755 tmpfs "$debian/run" ||
    fail "cannot mount the Debian root's /proc, /sys, /dev, /run"
for dir in src host scratch tmp var/lib/katalite var/lib/docker var/lib/containerd \
    var/lib/containers; do
    case $dir in
    src | host | scratch) from=/$dir ;;
    tmp) from=/scratch/tmp ;;
    var/lib/katalite) from=/scratch/katalite ;;
    *) from=/scratch/${dir#var/lib/} ;;
    esac
    mkdir -p "$from" "$debian/$dir" && mount -o bind "$from" "$debian/$dir" ||
        fail "cannot bind $from at the Debian root's /$dir"
done
mkdir -p "$debian/lab/busybox" && mount -o bind,ro /bin "$debian/lab/busybox" ||
    fail "cannot bind busybox at the Debian root's /lab/busybox"
rm -f "$debian/etc/resolv.conf" "$debian/etc/hostname"
cp /etc/resolv.conf "$debian/etc/resolv.conf"
echo lab >"$debian/etc/hostname"

# katalite as the engines will call it (it picks its front end by the name it runs as).
# Only katalite: what the host keeps in /usr/local/bin (a newer docker CLI, say) would
# shadow the Debian packages, which are all a fresh CI machine has.
mkdir -p "$debian/usr/local/bin" && mount -t tmpfs -o mode=0755 tmpfs "$debian/usr/local/bin" &&
    ln -s "$LAB_PATH/katalite" "$debian/usr/local/bin/katalite" &&
    ln -s katalite "$debian/usr/local/bin/katalite-runc" &&
    ln -s katalite "$debian/usr/local/bin/containerd-shim-katalite-v2" ||
    fail "cannot link katalite into /usr/local/bin"

# The kernel runs its module loader from the initramfs root, the Debian one in turn.
printf '#!/bin/sh\nexec chroot %s /sbin/modprobe "$@"\n' "$debian" >/lab/modprobe &&
    chmod 755 /lab/modprobe && echo /lab/modprobe >/proc/sys/kernel/modprobe ||
    fail "cannot install the module loader"
# shellcheck disable=SC2086 # a list of module names
in_debian modprobe -a $LAB_RUNTIMES_MODULES || fail "cannot load $LAB_RUNTIMES_MODULES"

# dockerd waits for containerd's socket by itself: start both at once.
in_debian sh -c 'exec containerd >/var/log/containerd.log 2>&1' &
in_debian sh -c 'exec dockerd >/var/log/dockerd.log 2>&1' &
wait_for 120 containerd ctr version
wait_for 180 dockerd docker version
