# Guest test "fs": a file system that must survive a reboot. First boot
# (no file system on /dev/vda yet): mke2fs, write /mnt/data (vu.size_kib of
# random data), record its md5 in /mnt/md5, unmount, reboot. Next boots: mount,
# check the file against the recorded md5, report, unmount.
# Results: fs_created (first boot), fs_data_md5 and fs_verified (later boots).
if ! wait_for /dev/vda; then
    fail "no /dev/vda"
elif mount -t ext2 /dev/vda /mnt 2>/dev/null; then
    result fs_data_md5 "$(md5sum < /mnt/data | cut -d' ' -f1)"
    if [ "$(md5sum < /mnt/data | cut -d' ' -f1)" = "$(cat /mnt/md5)" ]; then
        result fs_verified yes
    else
        fail "the file on the ext2 file system changed"
    fi
    umount /mnt
else
    mke2fs -q /dev/vda >/dev/null 2>&1 || fail "mke2fs failed"
    mount -t ext2 /dev/vda /mnt || fail "cannot mount the new file system"
    dd if=/dev/urandom of=/mnt/data bs=1k count="${vu_size_kib:-1024}" 2>/dev/null
    md5sum < /mnt/data | cut -d' ' -f1 > /mnt/md5
    result fs_created "$(cat /mnt/md5)"
    umount /mnt
    sync
    echo "INIT: rebooting"
    reboot -f
fi
