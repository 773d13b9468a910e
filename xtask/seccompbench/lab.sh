# The cost of the seccomp filters, by hand: the same runs with and without
# `--security-opt seccomp=unconfined`, alternating, in one lab boot. Run:
# cargo xtask lab run -- 'sh /src/xtask/seccompbench/lab.sh' (needs `cargo xtask lab e2e`
# once for the busybox tree). Prints one line per run: what, mode, start, end (uptime s).
set -e
BB=/scratch/sb
rm -rf $BB; cp -a /src/target/lab/rootfs/busybox $BB
t() { read a b < /proc/uptime; echo $a; }
for round in 1 2 3 4 5; do
  for mode in filtered unconfined; do
    opt=""; [ $mode = unconfined ] && opt="--security-opt seccomp=unconfined"
    s=$(t); katalite run $opt --rootfs $BB --network none -- true; e=$(t)
    echo "boot $mode $s $e"
  done
done
for round in 1 2 3; do
  for mode in filtered unconfined; do
    opt=""; [ $mode = unconfined ] && opt="--security-opt seccomp=unconfined"
    s=$(t); katalite run $opt --rootfs $BB --network none -- dd if=/dev/zero bs=65536 count=320 2>/dev/null | cat > /dev/null; e=$(t)
    echo "stdout20MiB $mode $s $e"
  done
done
