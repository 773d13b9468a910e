# Where a boot's time goes, by hand, for katalite and QEMU `-M microvm` booting the same
# kernel, initramfs, command line (plus `initcall_debug`) and memory, alternating, in one
# lab boot. Run: cargo xtask lab run -- 'sh /src/xtask/bootbench/lab.sh'. Writes each kernel log to
# /scratch/bootbench/ and prints, per run: wall time (start -> exit, uptime s), the kernel
# time at which init was started, then the slowest initcalls of the last run of each VMM.
set -e
OUT=/scratch/bootbench BB=/scratch/bootbench/bb
rm -rf $OUT; mkdir -p $OUT $BB/bin; cp /bin/busybox $BB/bin/
for applet in $(/bin/busybox --list); do [ $applet = busybox ] || ln -sf busybox $BB/bin/$applet; done
ROOT="--rootfs $BB --image-root initramfs --network none --memory 512m"
katalite run $ROOT --write-initramfs $OUT/initrd.img -- true
QEMU="/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu"
ARGS="console=ttyS0 8250.nr_uarts=1 reboot=t panic=-1 noirqdebug rdinit=/.katalite/init printk.time=1 loglevel=8 initcall_debug"
t() { read a b < /proc/uptime; echo $a; }
init_at() { sed -n 's/^.*\[ *\([0-9.]*\)\] Run \/.katalite\/init.*$/\1/p' $1 | head -1; }
for round in 1 2 3; do
  s=$(t); katalite run $ROOT --kernel-log --kernel-arg initcall_debug --kernel-arg loglevel=8 -- true 2> $OUT/katalite$round.log; e=$(t)
  echo "katalite round $round: $s -> $e, init started at kernel time $(init_at $OUT/katalite$round.log)"
  s=$(t); $QEMU -M microvm,acpi=off -enable-kvm -cpu host -smp 1 -m 512 -nodefaults -no-user-config \
    -nographic -serial stdio -no-reboot -chardev null,id=channel -device virtio-serial-device \
    -device ${CHANNEL_DEVICE:-virtconsole},chardev=channel,name=katalite.channel \
    -append "$ARGS" -kernel /src/target/guest/vmlinux -initrd $OUT/initrd.img > $OUT/qemu$round.log 2>&1; e=$(t)
  echo "qemu round $round: $s -> $e, init started at kernel time $(init_at $OUT/qemu$round.log)"
done
# One more katalite run under strace: when the process started, its first KVM_RUN (the
# guest's first instruction), and its exit, so the host-side setup shows apart.
HOSTRUN="/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu"
if [ -x /host/usr/bin/strace ]; then
  $HOSTRUN /host/usr/bin/strace -f -ttt -o $OUT/strace.txt katalite run $ROOT -- true || true
  echo "== strace: the host side before the guest's first instruction (gaps over 20 ms)"
  awk 'NR==1{t0=$2; p=$2} /KVM_RUN/{printf "first KVM_RUN at +%.3f s\n", $2-t0; exit}
       {if ($2-p > 0.02) printf "+%.3f s (gap %.3f s) before: %s\n", $2-t0, $2-p, substr($0,1,150); p=$2}' $OUT/strace.txt
  awk 'NR==1{t0=$2} END{printf "exit at +%.3f s\n", $2-t0}' $OUT/strace.txt
  echo "syscalls before the first KVM_RUN: $(awk '/KVM_RUN/{exit} {n++} END{print n}' $OUT/strace.txt)"
fi
for vmm in katalite qemu; do
  echo "== slowest initcalls, $vmm round 3 (usecs)"
  sed -n 's/^.*initcall \([^ ]*\) returned [-0-9]* after \([0-9]*\) usecs.*$/\2 \1/p' $OUT/${vmm}3.log | sort -n | tail -15 |
    while read us fn; do
      addr=$(echo $fn | sed -n 's/^0x\([0-9a-f]*\).*/\1/p')
      name=$fn; [ -n "$addr" ] && name=$(grep -m1 "^0*$addr " /src/target/guest/build/obj/System.map | cut -d' ' -f3)
      echo "$us ${name:-$fn}"
    done
  echo "== kernel log lines of $vmm round 3 after a gap over 20 ms (initcall lines left out)"
  grep -v "initcall" $OUT/${vmm}3.log | sed -n 's/^.*\[ *\([0-9.]*\)\] \(.*\)$/\1 \2/p' |
    awk '{if ($1-p > 0.02) printf "%.3f (+%.3f) %s\n", $1, $1-p, substr($0, index($0," ")+1, 110); p=$1}'
done
