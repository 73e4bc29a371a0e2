#!/bin/bash
# run.sh kind bodysize conns
taskset -c 0 python "$(dirname "$0")/server.py" $1 18080 $2 &
pid=$!; sleep 2
a=($(awk '{print $14, $15}' /proc/$pid/stat))
out=$(taskset -c 1 wrk -t1 -c$3 -d8s http://127.0.0.1:18080/live/x.m3u8 | grep -E "Requests/sec")
b=($(awk '{print $14, $15}' /proc/$pid/stat))
rps=$(echo $out | awk '{print $2}')
python3 -c "u=(${b[0]}-${a[0]})/100; s=(${b[1]}-${a[1]})/100; r=$rps*8; print('$1 body=$2 c=$3 rps=%d user=%.0fus sys=%.0fus per req' % ($rps, u/r*1e6, s/r*1e6))"
kill $pid; wait $pid 2>/dev/null
