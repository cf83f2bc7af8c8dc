# Guest test "blkpair": two disks, served by two backends, measured in
# alternation for an A/B comparison that the host's slow and fast periods
# cannot skew: each round runs every phase on one disk, then at once on the
# other, the order swapped every round. Disk "a" is the one whose serial is
# vu.a; disk "b" is the other virtio disk.
# Phases: 4 KiB O_DIRECT reads and writes at queue depth 1 (vu.ios requests)
# and at vu.qd (vu.ios_qd requests, vu.qd dd processes on 4 MiB stripes).
# A warm-up of vu.warmup requests of each kind runs on both disks first
# (first touches of page cache and guest pages), not measured.
# Results: rR_SIDE_PHASE=IOS START END, e.g. r1_a_read_qd1.
rounds=${vu_rounds:-3}
warmup=${vu_warmup:-1024}
ios=${vu_ios:-8192}
ios_qd=${vu_ios_qd:-4096}
qd=${vu_qd:-32}
run() {  # run DEV DEPTH read|write COUNT -> prints "IOS START END"
    per=$(($4 / $2))
    t0=$(uptime_s)
    i=0
    while [ "$i" -lt "$2" ]; do
        if [ "$3" = read ]; then
            dd if="/dev/$1" of=/dev/null bs=4k count="$per" skip=$((i * 1024)) iflag=direct 2>/dev/null &
        else
            dd if=/dev/zero of="/dev/$1" bs=4k count="$per" seek=$((i * 1024)) oflag=direct 2>/dev/null &
        fi
        i=$((i + 1))
    done
    wait
    echo "$((per * $2)) $t0 $(uptime_s)"
}
wait_for /dev/vda
wait_for /dev/vdb
a=""
b=""
for dev in /sys/block/vd*; do
    name=$(basename "$dev")
    if [ "$(cat "$dev/serial" 2>/dev/null)" = "$vu_a" ]; then a=$name; else b=$name; fi
done
if [ -z "$a" ] || [ -z "$b" ]; then
    fail "disks not found (a=$a b=$b)"
else
    for dev in "$a" "$b"; do
        run "$dev" 1 read "$warmup" >/dev/null
        run "$dev" 1 write "$warmup" >/dev/null
    done
    r=1
    while [ "$r" -le "$rounds" ]; do
        if [ $((r % 2)) -eq 1 ]; then order="a b"; else order="b a"; fi
        for phase in read_qd1 write_qd1 "read_qd$qd" "write_qd$qd"; do
            case "$phase" in
                *_qd1) depth=1; count=$ios ;;
                *) depth=$qd; count=$ios_qd ;;
            esac
            for side in $order; do
                if [ "$side" = a ]; then dev=$a; else dev=$b; fi
                result "r${r}_${side}_$phase" "$(run "$dev" "$depth" "${phase%%_*}" "$count")"
            done
        done
        r=$((r + 1))
    done
fi
