# Guest side of xtask/volbench/lab.sh: times each phase on the shared /data.
t() { read a b < /proc/uptime; echo $a; }
out=/data/result-$1.txt
: > $out
s=$(t); cat /data/big > /dev/null; e=$(t); echo "read $s $e" >> $out
s=$(t); dd if=/dev/zero of=/data/out bs=1M count=100 2>/dev/null; sync; e=$(t); echo "write $s $e" >> $out
rm -f /data/out
mkdir -p /data/small; cd /data/small
s=$(t); i=0; while [ $i -lt 5000 ]; do : > f$i; i=$((i+1)); done
ls -l > /dev/null; rm -f f*; e=$(t); echo "meta $s $e" >> $out
cd /; rmdir /data/small
s=$(t); tar cf - -C /data tree | cat > /dev/null; e=$(t); echo "tar $s $e" >> $out
