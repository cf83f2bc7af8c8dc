# Guest test "blkpair": two disks, served by two backends, measured in
# alternation for an A/B comparison that the host's slow and fast periods
# cannot skew: every phase of a round is cut into slices (vu.slices at
# queue depth 1, vu.slices_qd deeper, where a slice starts vu.qd processes),
# run on one disk, then at once on the other (the order swapped every
# slice), and each side's time is the sum of its slices. Both sides thus
# sample the same host periods, a few hundred milliseconds apart at most.
# Disk "a" is the one whose serial is vu.a; disk "b" is the other virtio
# disk.
# Phases: 4 KiB O_DIRECT reads and writes at queue depth 1 (vu.ios requests)
# and at vu.qd (vu.ios_qd requests, vu.qd dd processes on 4 MiB stripes).
# A warm-up of vu.warmup requests of each kind runs on both disks first
# (first touches of page cache and guest pages), not measured.
# Times come from /proc/uptime (10 ms steps), read with the shell's own
# `read`, so that no process start falls inside a slice but dd's own.
# Results: rR_SIDE_PHASE=IOS SECONDS, e.g. r1_a_read_qd1.
rounds=${vu_rounds:-3}
warmup=${vu_warmup:-1024}
ios=${vu_ios:-8192}
ios_qd=${vu_ios_qd:-8192}
qd=${vu_qd:-32}
slices_qd1=${vu_slices:-8}
slices_qd=${vu_slices_qd:-2}
centis() {  # the uptime in hundredths of a second, into $now
    read -r up _ < /proc/uptime
    now=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}
run() {  # run DEV DEPTH read|write COUNT SLICE -> the slice's time in $took
    per=$(($4 / $2))
    base=$(($5 * per))
    centis
    t0=$now
    i=0
    while [ "$i" -lt "$2" ]; do
        at=$((i * 1024 + base))
        if [ "$3" = read ]; then
            dd if="/dev/$1" of=/dev/null bs=4k count="$per" skip="$at" iflag=direct 2>/dev/null &
        else
            dd if=/dev/zero of="/dev/$1" bs=4k count="$per" seek="$at" oflag=direct 2>/dev/null &
        fi
        i=$((i + 1))
    done
    wait
    centis
    took=$((now - t0))
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
    slices=1
    for dev in "$a" "$b"; do
        run "$dev" 1 read "$warmup" 0
        run "$dev" 1 write "$warmup" 0
    done
    r=1
    while [ "$r" -le "$rounds" ]; do
        for phase in read_qd1 write_qd1 "read_qd$qd" "write_qd$qd"; do
            case "$phase" in
                *_qd1) depth=1; count=$ios; slices=$slices_qd1 ;;
                *) depth=$qd; count=$ios_qd; slices=$slices_qd ;;
            esac
            slice_count=$((count / slices / depth * depth))
            time_a=0
            time_b=0
            s=0
            while [ "$s" -lt "$slices" ]; do
                if [ $(((r + s) % 2)) -eq 1 ]; then order="a b"; else order="b a"; fi
                for side in $order; do
                    if [ "$side" = a ]; then dev=$a; else dev=$b; fi
                    run "$dev" "$depth" "${phase%%_*}" "$slice_count" "$s"
                    if [ "$side" = a ]; then
                        time_a=$((time_a + took))
                    else
                        time_b=$((time_b + took))
                    fi
                done
                s=$((s + 1))
            done
            done_ios=$((slice_count * slices))
            result "r${r}_a_$phase" "$done_ios $((time_a / 100)).$(printf %02d $((time_a % 100)))"
            result "r${r}_b_$phase" "$done_ios $((time_b / 100)).$(printf %02d $((time_b % 100)))"
        done
        r=$((r + 1))
    done
fi
