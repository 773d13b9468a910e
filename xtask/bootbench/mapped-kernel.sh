# Boot time of the same busybox `true` through the previous katalite (kernel decompressed at
# every boot), the new one (kernel segments mapped from the cache) and QEMU microvm, same
# kernel, initramfs, command line, memory; alternating rounds in one lab boot. katalite
# packs the busybox tree per run (`--rootfs`), which QEMU does not. Copy the previous
# static katalite to target/tmp/katalite-old first, then run:
# cargo xtask lab run -- 'sh /src/xtask/bootbench/mapped-kernel.sh'
set -e
OUT=/scratch/kmap BB=/scratch/kmap/bb
rm -rf $OUT; mkdir -p $OUT $BB/bin; cp /bin/busybox $BB/bin/
for applet in $(/bin/busybox --list); do [ $applet = busybox ] || ln -sf busybox $BB/bin/$applet; done
OLD=/src/target/tmp/katalite-old
ROOT="--rootfs $BB --image-root initramfs --network none --memory 512m"
katalite run $ROOT --write-initramfs $OUT/initrd.img -- true
QEMU="/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu"
ARGS="console=ttyS0 8250.nr_uarts=1 reboot=t panic=-1 noirqdebug rdinit=/.katalite/init quiet loglevel=3"
t() { read a b < /proc/uptime; echo $a; }
katalite run $ROOT -- true; $OLD run $ROOT -- true
ls -la /var/lib/katalite/kernel/ 2>/dev/null || ls -la ${KATALITE_CACHE_DIR:-/nonexistent}/kernel 2>/dev/null || true
for round in 1 2 3 4 5; do
  s=$(t); $OLD run $ROOT -- true; e=$(t); echo "old $round: $(echo "$e - $s" | bc)"
  s=$(t); katalite run $ROOT -- true; e=$(t); echo "new $round: $(echo "$e - $s" | bc)"
  s=$(t); $QEMU -M microvm,acpi=off -enable-kvm -cpu host -smp 1 -m 512 -nodefaults -no-user-config \
    -nographic -serial stdio -no-reboot -chardev null,id=channel -device virtio-serial-device \
    -device virtconsole,chardev=channel \
    -append "$ARGS" -kernel /src/target/guest/vmlinux -initrd $OUT/initrd.img > $OUT/qemu$round.log 2>&1; e=$(t)
  echo "qemu $round: $(echo "$e - $s" | bc)"
done
