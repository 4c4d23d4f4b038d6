#!/usr/bin/env bash
# Turn a stock Raspberry Pi OS Lite (Bookworm or later, 64-bit or 32-bit) into an Outpost appliance.
#
#   sudo raspberry-pi/firstboot.sh [--source DIR] [--config FILE]
#
# Run it once, either by hand over SSH or unattended at first boot (see README.md). It
#   1. installs the OS packages Outpost needs (Python venv, SQLite CLI for field debugging),
#   2. turns on NTP through systemd-timesyncd (a Pi has no real-time clock),
#   3. limits journald so logs cannot wear out or fill the SD card,
#   4. runs deploy/install.sh (user `outpost`, venv in /opt/outpost, config in /etc/outpost,
#      the systemd unit) and enables the service.
# Idempotent: a second run only re-applies settings and upgrades Outpost from --source.
# Everything it does is logged to /var/log/outpost-firstboot.log.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(cd "$SCRIPT_DIR/.." && pwd)"
CONFIG_SRC=""
# A configuration prepared on a PC can be dropped on the boot partition next to the source.
for candidate in /boot/firmware/outpost.toml /boot/outpost.toml; do
    if [[ -f "$candidate" ]]; then CONFIG_SRC="$candidate"; break; fi
done
NTP_SERVERS="${OUTPOST_NTP_SERVERS:-}"
LOG=/var/log/outpost-firstboot.log

while [[ $# -gt 0 ]]; do
    case "$1" in
        --source) SOURCE="$2"; shift 2 ;;
        --config) CONFIG_SRC="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "firstboot.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

if [[ $EUID -ne 0 ]]; then
    echo "firstboot.sh: run as root (sudo $0)" >&2
    exit 1
fi
exec > >(tee -a "$LOG") 2>&1
echo "firstboot.sh: $(date -u +%FT%TZ) starting (source $SOURCE)"

# 1. Packages. Retries because at first boot the network may still be coming up.
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3 4 5; do
    if apt-get update; then break; fi
    echo "firstboot.sh: apt-get update failed (attempt $attempt), retrying in 20 s"
    sleep 20
done
apt-get install -y --no-install-recommends python3 python3-venv python3-pip sqlite3 ca-certificates

# 2. Clock. timesyncd is Raspberry Pi OS's default; make sure it is on and, if asked, use
# site NTP servers (many plants block pool.ntp.org). fake-hwclock stays: it gives a
# plausible time at boot, which Outpost still treats as unsynchronised until NTP answers.
install -d /etc/systemd/timesyncd.conf.d
if [[ -n "$NTP_SERVERS" ]]; then
    printf '[Time]\nNTP=%s\n' "$NTP_SERVERS" > /etc/systemd/timesyncd.conf.d/outpost.conf
fi
systemctl unmask systemd-timesyncd.service || true
systemctl enable --now systemd-timesyncd.service
timedatectl set-ntp true

# 3. journald: persistent but small, and written in batches, to spare the SD card.
install -d /etc/systemd/journald.conf.d
cat > /etc/systemd/journald.conf.d/outpost.conf <<'CONF'
# Installed by Outpost's raspberry-pi/firstboot.sh: protect the SD card.
[Journal]
Storage=persistent
SystemMaxUse=64M
SystemKeepFree=256M
RuntimeMaxUse=32M
MaxRetentionSec=1month
# Write to the card every 5 minutes (and on warnings and worse) instead of continuously.
SyncIntervalSec=5m
RateLimitIntervalSec=30s
RateLimitBurst=1000
CONF
systemctl restart systemd-journald.service

# 4. Outpost itself.
if [[ -n "$CONFIG_SRC" ]]; then
    "$SOURCE/deploy/install.sh" --source "$SOURCE" --config "$CONFIG_SRC"
else
    "$SOURCE/deploy/install.sh" --source "$SOURCE" --no-start
    echo "firstboot.sh: no outpost.toml found; write /etc/outpost/outpost.toml, then: sudo systemctl start outpost"
fi
systemctl enable outpost.service

# Let the Pi's login user read status without sudo.
login_user="${SUDO_USER:-$(getent passwd 1000 | cut -d: -f1 || true)}"
if [[ -n "$login_user" && "$login_user" != root ]]; then
    usermod --append --groups outpost "$login_user"
    echo "firstboot.sh: $login_user may now run \`outpost status\` (after logging in again)"
fi

# Unattended runs are started by outpost-firstboot.service; it must not run again.
touch /var/lib/outpost-firstboot.done
echo "firstboot.sh: $(date -u +%FT%TZ) done"
