# Guest test "net": configure the virtio-net interface with vu.ip (a /24)
# and ping vu.peer vu.count times (default 1000), adaptive (-A).
# Results: net_driver, net_mac, net_transmitted, net_received.
count=${vu_count:-1000}
dev=""
for n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    for path in /sys/class/net/*; do
        [ -e "$path/device" ] || continue
        dev=$(basename "$path")
    done
    [ -n "$dev" ] && break
    sleep 0.1
done
if [ -z "$dev" ]; then
    fail "no network interface"
else
    result net_driver "$(basename "$(readlink "/sys/class/net/$dev/device/driver")")"
    result net_mac "$(cat "/sys/class/net/$dev/address")"
    ip link set "$dev" up
    ip addr add "$vu_ip/24" dev "$dev"
    # The first answers wait for ARP and the link: not counted.
    ping -c 3 -W 2 "$vu_peer" > /dev/null 2>&1
    ping -A -q -c "$count" -W 2 "$vu_peer" > /tmp/ping 2>&1
    cat /tmp/ping
    stats=$(grep "packets transmitted" /tmp/ping)
    result net_transmitted "$(echo "$stats" | cut -d' ' -f1)"
    result net_received "$(echo "$stats" | cut -d' ' -f4)"
fi
