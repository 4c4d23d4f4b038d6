#!/usr/bin/env bash
# Provision a Raspberry Pi as an Outpost appliance, offline. Run once at first boot by
# outpost-firstboot.service (in an image made by build-image.sh), or by hand over SSH:
#
#   sudo raspberry-pi/firstboot.sh [--boot DIR] [--wheelhouse DIR]
#
# Reads the provisioning folder on the boot partition (default /boot/firmware/outpost):
#   settings.conf    hostname=pump3, user=field, ntp="10.0.0.1", timezone=Europe/Berlin
#   authorized_keys  SSH public keys for the login user (SSH allows keys only)
#   outpost.toml     the site configuration   -> /etc/outpost/outpost.toml (root:outpost 0640)
#   outpost.env      secrets, KEY=value lines -> /etc/outpost/outpost.env  (root:root 0600)
# and then REMOVES outpost.toml, outpost.env and authorized_keys from the FAT partition,
# which anyone who pulls the card can read. Installs Outpost from the wheelhouse in
# /opt/outpost/dist (no network), enables time sync, and starts the service when a valid
# configuration is present. Idempotent; its log is /var/log/outpost-firstboot.log.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BOOT_DIR=/boot/firmware/outpost
WHEELHOUSE=""
LOG=/var/log/outpost-firstboot.log

while [[ $# -gt 0 ]]; do
    case "$1" in
        --boot) BOOT_DIR="$2"; shift 2 ;;
        --wheelhouse) WHEELHOUSE="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "firstboot.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [[ $EUID -ne 0 ]]; then
    echo "firstboot.sh: run as root (sudo $0)" >&2
    exit 1
fi
exec > >(tee -a "$LOG") 2>&1
say() { echo "firstboot.sh: $*"; }
say "$(date -u +%FT%TZ) starting (provisioning folder $BOOT_DIR)"
# An image built with --read-only-root: provisioning writes /etc and /opt once.
if findmnt -no OPTIONS / | grep -qE '(^|,)ro(,|$)'; then
    mount -o remount,rw /
    trap 'sync; mount -o remount,ro / || say "could not remount / read-only (busy); it is at the next boot"' EXIT
fi

if [[ -z "$WHEELHOUSE" ]]; then
    WHEELHOUSE="$(find /opt/outpost/dist -mindepth 2 -maxdepth 2 -type d -name wheelhouse 2>/dev/null | sort | tail -1)"
fi
INSTALLER="$(dirname "$WHEELHOUSE")/deploy/install.sh"
if [[ -z "$WHEELHOUSE" || ! -x "$INSTALLER" ]]; then
    say "no Outpost release under /opt/outpost/dist (give --wheelhouse DIR of an unpacked \`make dist\` tarball)" >&2
    exit 1
fi

# settings.conf is read as KEY=value lines, never executed: the FAT partition is not trusted.
setting() {
    local file="$BOOT_DIR/settings.conf"
    [[ -f "$file" ]] || return 0
    sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$file" | tail -1 | tr -d '\r"'"'"
}
HOSTNAME_WANTED="$(setting hostname)"
LOGIN_USER="$(setting user)"
NTP_SERVERS="$(setting ntp)"
TIMEZONE="$(setting timezone)"

# 1. Host name.
if [[ -n "$HOSTNAME_WANTED" ]]; then
    if [[ ! "$HOSTNAME_WANTED" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]]; then
        say "settings.conf: hostname '$HOSTNAME_WANTED' is not a valid host name; keeping $(cat /etc/hostname)" >&2
    else
        old="$(cat /etc/hostname 2>/dev/null || true)"
        echo "$HOSTNAME_WANTED" > /etc/hostname
        if grep -qs '^127\.0\.1\.1' /etc/hosts; then
            sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$HOSTNAME_WANTED/" /etc/hosts
        else
            printf '127.0.1.1\t%s\n' "$HOSTNAME_WANTED" >> /etc/hosts
        fi
        hostname "$HOSTNAME_WANTED" 2>/dev/null || true
        say "host name $old -> $HOSTNAME_WANTED"
    fi
fi
if [[ -n "$TIMEZONE" && -f "/usr/share/zoneinfo/$TIMEZONE" ]]; then
    ln -sf "/usr/share/zoneinfo/$TIMEZONE" /etc/localtime
    echo "$TIMEZONE" > /etc/timezone
fi

# 2. The login user and SSH: keys only. The user gets sudo (`sudo outpost status`) and is put
# in no Outpost group: it reads neither the configuration nor the secrets without sudo.
if [[ -n "$LOGIN_USER" ]]; then
    if ! getent passwd "$LOGIN_USER" >/dev/null; then
        useradd --create-home --shell /bin/bash "$LOGIN_USER"
        passwd --lock "$LOGIN_USER" >/dev/null
        say "created the login user $LOGIN_USER (password locked: SSH keys only)"
    fi
    getent group sudo >/dev/null && usermod --append --groups sudo "$LOGIN_USER"
    if [[ -f "$BOOT_DIR/authorized_keys" ]]; then
        home="$(getent passwd "$LOGIN_USER" | cut -d: -f6)"
        install -d -m 0700 -o "$LOGIN_USER" -g "$LOGIN_USER" "$home/.ssh"
        tr -d '\r' < "$BOOT_DIR/authorized_keys" > "$home/.ssh/authorized_keys"
        chown "$LOGIN_USER:$LOGIN_USER" "$home/.ssh/authorized_keys"
        chmod 0600 "$home/.ssh/authorized_keys"
        say "installed $(grep -c '^ssh-\|^ecdsa-\|^sk-' "$home/.ssh/authorized_keys" || true) SSH key(s) for $LOGIN_USER"
    fi
    # A passwordless sudo for a key-only user; the account has no password to type.
    if [[ -d /etc/sudoers.d ]]; then
        echo "$LOGIN_USER ALL=(ALL) NOPASSWD: ALL" > "/etc/sudoers.d/010_outpost-$LOGIN_USER"
        chmod 0440 "/etc/sudoers.d/010_outpost-$LOGIN_USER"
    else
        say "sudo is not installed: $LOGIN_USER has no administrator rights (Raspberry Pi OS has sudo)"
    fi
fi
install -d -m 0755 /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/outpost.conf <<'CONF'
# Installed by Outpost's firstboot.sh: SSH with keys only, never as root.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
CONF
if systemctl cat ssh.service >/dev/null 2>&1 || [[ -e /lib/systemd/system/ssh.service ]]; then
    systemctl enable ssh.service >/dev/null 2>&1 || true
fi

# 3. Clock: timesyncd on, with site NTP servers if given (many plants block public NTP).
if [[ -n "$NTP_SERVERS" ]]; then
    install -d /etc/systemd/timesyncd.conf.d
    printf '[Time]\nNTP=%s\n' "$NTP_SERVERS" > /etc/systemd/timesyncd.conf.d/outpost.conf
fi
if [[ -e /lib/systemd/system/systemd-timesyncd.service ]]; then
    systemctl unmask systemd-timesyncd.service >/dev/null 2>&1 || true
    systemctl enable systemd-timesyncd.service >/dev/null 2>&1 || true
fi

# 4. journald sized for an SD card (build-image.sh already put it there; a hand install too).
install -d /etc/systemd/journald.conf.d
install -m 0644 "$SCRIPT_DIR/files/journald-outpost.conf" /etc/systemd/journald.conf.d/outpost.conf

# 5. Outpost, from the wheelhouse, offline. The configuration moves off the FAT partition.
config_arg=()
if [[ -f "$BOOT_DIR/outpost.toml" ]]; then config_arg=(--config "$BOOT_DIR/outpost.toml"); fi
"$INSTALLER" --wheelhouse "$WHEELHOUSE" --no-start "${config_arg[@]}"
if [[ -f "$BOOT_DIR/outpost.env" ]]; then
    install -m 0600 -o root -g root /dev/null /etc/outpost/outpost.env.new
    tr -d '\r' < "$BOOT_DIR/outpost.env" > /etc/outpost/outpost.env.new
    mv /etc/outpost/outpost.env.new /etc/outpost/outpost.env
    say "secrets moved to /etc/outpost/outpost.env (root only)"
fi
for f in outpost.toml outpost.env authorized_keys; do
    if [[ -f "$BOOT_DIR/$f" ]]; then
        # Overwrite before deleting: FAT keeps deleted clusters readable until reused.
        size=$(stat -c %s "$BOOT_DIR/$f")
        head -c "$size" /dev/zero > "$BOOT_DIR/$f" 2>/dev/null || true
        sync "$BOOT_DIR/$f" 2>/dev/null || true
        rm -f "$BOOT_DIR/$f"
        say "removed $f from the boot partition"
    fi
done
sync

# 6. Start. From inside a boot job, never wait for another job (that would deadlock).
systemctl enable outpost.service >/dev/null
if [[ -e /etc/outpost/outpost.toml ]]; then
    if /opt/outpost/venv/bin/outpost check /etc/outpost/outpost.toml; then
        if [[ -d /run/systemd/system ]]; then systemctl start --no-block outpost.service; fi
    else
        say "/etc/outpost/outpost.toml does not validate: fix it, then \`sudo systemctl start outpost\`" >&2
    fi
else
    say "no outpost.toml was provided: write /etc/outpost/outpost.toml, then \`sudo systemctl start outpost\`"
fi

touch /var/lib/outpost-firstboot.done
say "$(date -u +%FT%TZ) done"
