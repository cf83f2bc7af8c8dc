# Guest test "blkbench": 4 KiB O_DIRECT reads and writes on /dev/vda at
# queue depth 1 (one dd) and vu.qd (that many dd processes in parallel, each
# on its own 4 MiB stripe), vu.ios requests per phase (default 2048).
# Timing comes from /proc/uptime (10 ms resolution), so phases should last
# at least a few hundred milliseconds.
# Results: PHASE=IOS START END for read_qd1, write_qd1, read_qdN, write_qdN.
ios=${vu_ios:-2048}
qd=${vu_qd:-32}
phase() {  # phase NAME DEPTH read|write
    per=$((ios / $2))
    t0=$(uptime_s)
    i=0
    while [ "$i" -lt "$2" ]; do
        if [ "$3" = read ]; then
            dd if=/dev/vda of=/dev/null bs=4k count="$per" skip=$((i * 1024)) iflag=direct 2>/dev/null &
        else
            dd if=/dev/zero of=/dev/vda bs=4k count="$per" seek=$((i * 1024)) oflag=direct 2>/dev/null &
        fi
        i=$((i + 1))
    done
    wait
    result "$1" "$((per * $2)) $t0 $(uptime_s)"
    result "$1_stat" "$(cat /sys/block/vda/stat)"
}
if wait_for /dev/vda; then
    phase read_qd1 1 read
    phase write_qd1 1 write
    phase "read_qd$qd" "$qd" read
    phase "write_qd$qd" "$qd" write
else
    fail "no /dev/vda"
fi
