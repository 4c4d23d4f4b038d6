#!/usr/bin/env bash
# Turn a Raspberry Pi OS Lite image into an Outpost image (run on a Linux PC, as root).
#
#   sudo raspberry-pi/build-image.sh --image raspios-bookworm-arm64-lite.img \
#        --dist dist/outpost-0.1.0-aarch64.tar.gz --output outpost-pump3.img \
#        [--hostname pump3] [--user field] [--ssh-key ~/.ssh/id_ed25519.pub]
#        [--config site.toml] [--env site.env] [--ntp "10.0.0.1 10.0.0.2"]
#        [--rs485 sc16is752 | --rs485 uart] [--read-only-root [--data-size 1G]]
#
# The image gets: the release tarball (wheelhouse + installer) in /opt/outpost/dist and this
# folder's scripts in /opt/outpost/raspberry-pi; outpost-firstboot.service, which provisions
# the Pi offline at its first boot (firstboot.sh); the hardware watchdog (dtparam=watchdog=on,
# fed by systemd); journald sized for an SD card; systemd-timesyncd enabled; the serial
# overlays asked for; and a provisioning folder `outpost/` on the FAT boot partition, to edit
# after flashing (settings.conf, authorized_keys, outpost.toml, outpost.env). --config, --env,
# --ssh-key and the settings options fill that folder now instead. Nothing in it stays on the
# card after the first boot.
#   --rs485 sc16is752  SPI RS-485 HATs with the SC16IS752 (Waveshare 2-CH RS485 HAT): /dev/ttySC0, ttySC1
#   --rs485 uart       an RS-485 transceiver on GPIO 14/15: the PL011 UART as /dev/ttyAMA0,
#                      Bluetooth moved off it and the serial console removed from cmdline.txt
#   --read-only-root   root mounted read-only; a third partition (LABEL=outpost-data, --data-size,
#                      default 1G) holds the buffer (/var/lib/outpost); /tmp, /var/tmp and the
#                      journal live in RAM. Upgrades: `sudo mount -o remount,rw /` first.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IMAGE="" DIST="" OUTPUT=""
HOSTNAME_WANTED="" LOGIN_USER="" SSH_KEY="" CONFIG="" ENVFILE="" NTP=""
RS485="" READ_ONLY=0 DATA_SIZE=1G

die() { echo "build-image.sh: $*" >&2; exit 2; }
say() { echo "build-image.sh: $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --image) IMAGE="$2"; shift 2 ;;
        --dist) DIST="$2"; shift 2 ;;
        --output) OUTPUT="$2"; shift 2 ;;
        --hostname) HOSTNAME_WANTED="$2"; shift 2 ;;
        --user) LOGIN_USER="$2"; shift 2 ;;
        --ssh-key) SSH_KEY="$2"; shift 2 ;;
        --config) CONFIG="$2"; shift 2 ;;
        --env) ENVFILE="$2"; shift 2 ;;
        --ntp) NTP="$2"; shift 2 ;;
        --rs485) RS485="$2"; shift 2 ;;
        --read-only-root) READ_ONLY=1; shift ;;
        --data-size) DATA_SIZE="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option $1 (try --help)" ;;
    esac
done
[[ $EUID -eq 0 ]] || die "run as root (loop devices and mounts)"
[[ -f "$IMAGE" ]] || die "--image: no such file: $IMAGE"
[[ -f "$DIST" && "$DIST" == *.tar.gz ]] || die "--dist: give a tarball made by \`make dist\` (outpost-VERSION-ARCH.tar.gz)"
[[ -n "$OUTPUT" ]] || die "--output: where to write the Outpost image"
case "$RS485" in ""|sc16is752|uart) ;; *) die "--rs485: sc16is752 or uart, not '$RS485'" ;; esac
for f in "$SSH_KEY" "$CONFIG" "$ENVFILE"; do [[ -z "$f" || -f "$f" ]] || die "no such file: $f"; done
# grep without -q reads the whole list: with -q, tar would die of SIGPIPE and pipefail report it.
tar -tzf "$DIST" | grep '/wheelhouse/requirements.txt$' >/dev/null || die "$DIST has no wheelhouse: not a \`make dist\` tarball"
for tool in sfdisk mkfs.ext4 losetup truncate mcopy; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install fdisk e2fsprogs util-linux mtools)"
done

# The Pi's layout: partition 1 FAT (boot, mounted at /boot/firmware), partition 2 ext4 (root).
cp --sparse=always "$IMAGE" "$OUTPUT.partial"
table="$(sfdisk --json "$OUTPUT.partial")"
part() {  # part N start|size, in bytes
    python3 -c 'import json,sys; t=json.loads(sys.argv[1])["partitiontable"]; p=t["partitions"][int(sys.argv[2])-1]; print(p[sys.argv[3]] * t.get("sectorsize", 512))' "$table" "$1" "$2"
}
nparts="$(python3 -c 'import json,sys; print(len(json.loads(sys.argv[1])["partitiontable"]["partitions"]))' "$table")"
[[ "$nparts" -ge 2 ]] || die "$IMAGE has $nparts partition(s); a Raspberry Pi OS image has a FAT boot and an ext4 root partition"

if [[ $READ_ONLY -eq 1 && "$nparts" -eq 2 ]]; then
    end=$(( $(part 2 start) + $(part 2 size) ))
    start=$(( (end + 4194303) / 4194304 * 4194304 ))   # 4 MiB aligned, as the Pi's partitions
    truncate -s "$start" "$OUTPUT.partial"
    truncate -s "+$DATA_SIZE" "$OUTPUT.partial"
    echo "start=$(( start / 512 )), type=83" | sfdisk --quiet --append "$OUTPUT.partial"
    table="$(sfdisk --json "$OUTPUT.partial")"
    data_loop="$(losetup --find --show --offset "$(part 3 start)" --sizelimit "$(part 3 size)" "$OUTPUT.partial")"
    mkfs.ext4 -q -L outpost-data "$data_loop"
    losetup -d "$data_loop"
    say "added partition 3 (LABEL=outpost-data, $DATA_SIZE) for the buffer"
fi

MNT="$(mktemp -d /tmp/outpost-image.XXXXXX)"
loops=()
cleanup() {
    if mountpoint -q "$MNT/root"; then umount "$MNT/root"; fi
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$MNT/boot"
    rmdir "$MNT/root" "$MNT" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$MNT/root" "$MNT/boot"
root_loop="$(losetup --find --show --offset "$(part 2 start)" --sizelimit "$(part 2 size)" "$OUTPUT.partial")"
loops+=("$root_loop")
mount "$root_loop" "$MNT/root"
R="$MNT/root"
# The FAT boot partition is edited with mtools (no vfat mount needed): its files are copied
# out to $B, changed there, and copied back at the end.
export MTOOLS_SKIP_CHECK=1
FAT="$OUTPUT.partial@@$(part 1 start)"
B="$MNT/boot"
for f in config.txt cmdline.txt; do
    mcopy -n -i "$FAT" "::$f" "$B/$f" 2>/dev/null || die "partition 1 has no $f: not a Raspberry Pi OS image"
done
[[ -x "$R/usr/bin/python3" ]] || die "the image has no python3 (Raspberry Pi OS Lite has it)"

# 1. The release and the provisioning scripts.
rm -rf "$R/opt/outpost/dist" "$R/opt/outpost/raspberry-pi"
install -d -m 0755 "$R/opt/outpost/dist" "$R/opt/outpost/raspberry-pi/files"
tar -xzf "$DIST" -C "$R/opt/outpost/dist" --no-same-owner
install -m 0755 "$SCRIPT_DIR/firstboot.sh" "$R/opt/outpost/raspberry-pi/"
install -m 0644 "$SCRIPT_DIR"/files/* "$R/opt/outpost/raspberry-pi/files/"
install -m 0644 "$SCRIPT_DIR/outpost-firstboot.service" "$R/etc/systemd/system/"
rm -f "$R/var/lib/outpost-firstboot.done"
systemctl --root="$R" enable outpost-firstboot.service >/dev/null 2>&1
say "release $(basename "$DIST") in /opt/outpost/dist; outpost-firstboot.service enabled"

# 2. Watchdog, journald, time sync.
install -d "$R/etc/systemd/system.conf.d" "$R/etc/systemd/journald.conf.d"
install -m 0644 "$SCRIPT_DIR/files/watchdog-outpost.conf" "$R/etc/systemd/system.conf.d/outpost-watchdog.conf"
install -m 0644 "$SCRIPT_DIR/files/journald-outpost.conf" "$R/etc/systemd/journald.conf.d/outpost.conf"
if [[ -e "$R/lib/systemd/system/systemd-timesyncd.service" ]]; then
    systemctl --root="$R" unmask systemd-timesyncd.service >/dev/null 2>&1 || true
    systemctl --root="$R" enable systemd-timesyncd.service >/dev/null 2>&1
    say "systemd-timesyncd enabled"
else
    say "warning: the image has no systemd-timesyncd; install a time sync service (the gateway flags unsynced clocks)"
fi

# 3. config.txt: one block of ours, replaced on every run.
sed -i '/^# >>> outpost >>>$/,/^# <<< outpost <<<$/d' "$B/config.txt"
{
    echo "# >>> outpost >>>"
    echo "[all]"
    echo "# Hardware watchdog for systemd (RuntimeWatchdogSec in system.conf.d/outpost-watchdog.conf)."
    echo "dtparam=watchdog=on"
    case "$RS485" in
        sc16is752)
            echo "# SC16IS752 RS-485 HAT on SPI1 (Waveshare 2-CH RS485 HAT): /dev/ttySC0 and /dev/ttySC1."
            echo "dtparam=spi=on"
            echo "dtoverlay=sc16is752-spi1,int_pin=24" ;;
        uart)
            echo "# RS-485 transceiver on GPIO 14/15: the PL011 UART as /dev/ttyAMA0, Bluetooth off it."
            echo "enable_uart=1"
            echo "dtoverlay=disable-bt" ;;
    esac
    echo "# <<< outpost <<<"
} >> "$B/config.txt"
if [[ "$RS485" == uart ]]; then
    # The UART is the bus now, not a login console.
    sed -i -E 's/(^| )console=(serial0|ttyAMA0|ttyS0),[0-9]+//g' "$B/cmdline.txt"
    systemctl --root="$R" mask serial-getty@ttyAMA0.service serial-getty@serial0.service >/dev/null 2>&1 || true
fi

# 4. Read-only root with the buffer on the data partition.
if [[ $READ_ONLY -eq 1 ]]; then
    sed -i '/# outpost read-only root$/d' "$R/etc/fstab"
    # The root line (mount point "/") gets ro.
    awk '$2 == "/" && $4 !~ /(^|,)ro(,|$)/ { $4 = $4 ",ro" } { print }' OFS='\t' "$R/etc/fstab" > "$R/etc/fstab.new"
    mv "$R/etc/fstab.new" "$R/etc/fstab"
    {
        printf 'LABEL=outpost-data\t/var/lib/outpost\text4\tdefaults,noatime\t0\t2\t# outpost read-only root\n'
        printf 'tmpfs\t/tmp\ttmpfs\tmode=1777,size=64M\t0\t0\t# outpost read-only root\n'
        printf 'tmpfs\t/var/tmp\ttmpfs\tmode=1777,size=16M\t0\t0\t# outpost read-only root\n'
        printf 'tmpfs\t/var/log\ttmpfs\tmode=0755,size=48M\t0\t0\t# outpost read-only root\n'
    } >> "$R/etc/fstab"
    install -d -m 0750 "$R/var/lib/outpost"
    printf '[Journal]\nStorage=volatile\n' > "$R/etc/systemd/journald.conf.d/outpost-readonly.conf"
    say "read-only root: / ro, /var/lib/outpost on LABEL=outpost-data, journal in RAM"
fi

# 5. The provisioning folder on the boot partition, edited after flashing.
mdeltree -i "$FAT" ::outpost >/dev/null 2>&1 || true
install -d "$B/outpost"
install -m 0644 "$R/opt/outpost/dist/"*/deploy/examples/outpost.toml "$B/outpost/outpost.toml.example"
cat > "$B/outpost/settings.conf" <<CONF
# Outpost first-boot settings, read once at the first boot (KEY=value; never executed).
# Put your SSH public key(s) in authorized_keys beside this file: SSH allows keys only.
# Put the site configuration in outpost.toml (see outpost.toml.example) and secrets in
# outpost.env (OUTPOST_MQTT_PASSWORD=...). The first boot moves them into /etc/outpost and
# deletes them from this partition.
hostname=${HOSTNAME_WANTED:-outpost}
user=${LOGIN_USER:-field}
ntp=${NTP}
timezone=
CONF
if [[ -n "$SSH_KEY" ]]; then install -m 0644 "$SSH_KEY" "$B/outpost/authorized_keys"; fi
if [[ -n "$CONFIG" ]]; then install -m 0644 "$CONFIG" "$B/outpost/outpost.toml"; fi
if [[ -n "$ENVFILE" ]]; then install -m 0644 "$ENVFILE" "$B/outpost/outpost.env"; fi
mcopy -o -i "$FAT" "$B/config.txt" "$B/cmdline.txt" ::
mcopy -s -o -i "$FAT" "$B/outpost" ::

sync
cleanup
trap - EXIT
mv "$OUTPUT.partial" "$OUTPUT"
say "wrote $OUTPUT: flash it, edit outpost/ on the boot partition, boot (see raspberry-pi/README.md)"
