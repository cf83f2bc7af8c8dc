# Guest test "migrate": the disk is read and written while the host migrates
# the VM. Patterns A and B (vu.size_mib MiB each, random) are made; A is
# written at vu.a_mib with O_DIRECT, then "@@ READY". Then rounds run until
# the host writes "MIGRATED" at vu.marker_mib (once the migration completed),
# at most vu.max_rounds: round i writes 256 KiB chunk i of B at vu.b_mib and
# reads 1 MiB chunk i of A back, comparing it with its md5 taken before.
# Afterwards the whole of B is written, and both areas are read back.
# Results: a_md5, b_md5, READY, round (each round), mismatches, marker_round,
# a_final_md5, b_readback_md5.
size=${vu_size_mib:-4}
a=${vu_a_mib:-16}
b=${vu_b_mib:-24}
marker=${vu_marker_mib:-40}
max=${vu_max_rounds:-5000}
md5() { md5sum | cut -d' ' -f1; }
rd() { dd if=/dev/vda bs="$1" skip="$2" count="$3" iflag=direct 2>/dev/null; }
if wait_for /dev/vda; then
    dd if=/dev/urandom of=/tmp/a bs=1M count="$size" 2>/dev/null
    dd if=/dev/urandom of=/tmp/b bs=1M count="$size" 2>/dev/null
    a_md5=$(md5 < /tmp/a)
    result a_md5 "$a_md5"
    result b_md5 "$(md5 < /tmp/b)"
    k=0
    while [ "$k" -lt "$size" ]; do
        eval "a_$k=$(dd if=/tmp/a bs=1M skip="$k" count=1 2>/dev/null | md5)"
        k=$((k + 1))
    done
    dd if=/tmp/a of=/dev/vda bs=1M seek="$a" oflag=direct conv=fsync 2>/dev/null \
        || fail "writing pattern A"
    result READY 1
    i=0
    mismatches=0
    seen=""
    chunks=$((size * 4))
    while [ "$i" -lt "$max" ]; do
        i=$((i + 1))
        c=$((i % chunks))
        dd if=/tmp/b of=/dev/vda bs=256K skip="$c" seek=$((b * 4 + c)) count=1 \
            oflag=direct 2>/dev/null || fail "writing B in round $i"
        k=$((i % size))
        eval "want=\$a_$k"
        [ "$(rd 1M $((a + k)) 1 | md5)" = "$want" ] || mismatches=$((mismatches + 1))
        result round "$i"
        if [ "$(rd 4096 $((marker * 256)) 1 | head -c 8)" = "MIGRATED" ]; then
            seen=$i
            break
        fi
    done
    result mismatches "$mismatches"
    if [ -n "$seen" ]; then
        result marker_round "$seen"
    else
        fail "the host never wrote the marker ($max rounds)"
    fi
    dd if=/tmp/b of=/dev/vda bs=1M seek="$b" oflag=direct conv=fsync 2>/dev/null \
        || fail "writing pattern B"
    result a_final_md5 "$(rd 1M "$a" "$size" | md5)"
    result b_readback_md5 "$(rd 1M "$b" "$size" | md5)"
else
    fail "no /dev/vda"
fi
