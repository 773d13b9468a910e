# The volumes comparison, by hand until it joins `cargo xtask bench`: katalite -v beside
# QEMU microvm + Debian virtiofsd (vhost-user-fs), same kernel, busybox and data, in one lab
# boot. Run: cargo xtask lab run -- 'sh /src/xtask/volbench/lab.sh' (needs `cargo xtask lab e2e`
# once for the busybox tree). Each guest writes /data/result-NAME.txt: phase, start, end
# (seconds of guest uptime).
set -e
L="/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu"
W=/scratch/vb
rm -rf $W; mkdir -p $W/data/tree
cp -a /src/target/lab/rootfs/busybox $W/bb
cp /src/xtask/volbench/guest.sh $W/bb/guest.sh
head -c 104857600 /dev/urandom > $W/data/big
for d in $(seq 1 100); do mkdir $W/data/tree/d$d; for f in $(seq 1 100); do echo "file $d $f" > $W/data/tree/d$d/f$f; done; done
VMLINUX=$(ls /src/target/guest/vmlinux)
for round in 1; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  katalite run --rootfs $W/bb -v $W/data:/data -- sh /guest.sh katalite$round
  katalite run --rootfs $W/bb --image-root initramfs --write-initramfs $W/q.img --network none -- sh -c "mkdir -p /data && mount -t virtiofs katalite-vol0 /data && sh /guest.sh qemu$round"
  sync; echo 3 > /proc/sys/vm/drop_caches
  rm -f /tmp/vfsd.sock
  $L /host/usr/lib/qemu/virtiofsd --socket-path=/tmp/vfsd.sock -o source=$W/data -o cache=auto -o sandbox=chroot > $W/vfsd.log 2>&1 &
  sleep 1
  $L /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu -M microvm,acpi=off,memory-backend=mem -global virtio-mmio.force-legacy=false -enable-kvm -cpu host -smp 1 -m 512 \
    -object memory-backend-memfd,id=mem,size=512M,share=on -nodefaults -no-user-config -nographic -serial file:$W/qemu.serial -no-reboot \
    -chardev null,id=channel -device virtio-serial-device -device virtconsole,chardev=channel \
    -chardev socket,id=fs0,path=/tmp/vfsd.sock -device vhost-user-fs-device,chardev=fs0,tag=katalite-vol0,queue-size=1024 \
    -append "console=ttyS0 8250.nr_uarts=1 reboot=t panic=-1 noirqdebug rdinit=/.katalite/init quiet loglevel=3" \
    -kernel $VMLINUX -initrd $W/q.img || true
  wait || true
done
for f in $W/data/result-*.txt; do echo "== $f"; cat $f; done
tail -5 $W/qemu.serial; tail -5 $W/vfsd.log
