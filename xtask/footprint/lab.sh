# Quick footprint figures by hand (issue 16), in one lab boot, until a full
# `cargo xtask bench` run: guest stdout throughput and the VMM's memory beyond guest RAM.
# Run: cargo xtask lab run -- 'sh /src/xtask/footprint/lab.sh' (needs `cargo xtask lab e2e`
# once for the busybox tree).
set -e
BB=/scratch/fp
rm -rf $BB; cp -a /src/target/lab/rootfs/busybox $BB
t() { read a b < /proc/uptime; echo $a; }
for round in 1 2 3; do
  s=$(t); n=$(katalite run --rootfs $BB --network none -- head -c 33554432 /dev/zero | wc -c); e=$(t)
  echo "stdout round $round: $n bytes in $(echo "$e - $s" | bc 2>/dev/null || echo "$s..$e") s ($s -> $e)"
done
for round in 1 2 3; do
  katalite run --rootfs $BB --network none --memory 256m -- sleep 6 & sleep 4
  pid=$(pidof katalite | tr ' ' '\n' | head -1)
  rss=$(awk '/^VmRSS/{print $2}' /proc/$pid/status); hwm=$(awk '/^VmHWM/{print $2}' /proc/$pid/status)
  guest=$(awk '/^[0-9a-f]+-[0-9a-f]+ /{split($1,a,"-"); big=0} /^Size:/{if ($2==262144) big=1} /^Rss:/{if (big) {print $2; big=0}}' /proc/$pid/smaps | head -1)
  echo "memory round $round: VmRSS $rss kB, guest RAM touched $guest kB, overhead $((rss - guest)) kB, VmHWM $hwm kB"
  wait
done
