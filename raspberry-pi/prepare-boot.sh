#!/usr/bin/env bash
# Prepare a freshly written Raspberry Pi OS Lite SD card for an unattended Outpost install.
#
#   raspberry-pi/prepare-boot.sh BOOT_DIR [--config outpost.toml] [--source DIR]
#
# BOOT_DIR is the card's boot partition (FAT, mounted on the PC, e.g. /media/$USER/bootfs).
# Write the image with Raspberry Pi Imager first and set hostname, user, SSH and Wi-Fi
# there: Imager's own first-boot hook is what this script attaches to. It copies the
# Outpost source (and your configuration) onto the boot partition and adds one line to
# that hook, which on first boot copies the source to /opt/outpost/src and enables
# outpost-firstboot.service; that service runs firstboot.sh once the network is up.
#   Bookworm images: Imager writes firstrun.sh (run via systemd.run= in cmdline.txt).
#   Trixie and later: Imager writes cloud-init `user-data`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(cd "$SCRIPT_DIR/.." && pwd)"
BOOT=""
CONFIG_SRC=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG_SRC="$2"; shift 2 ;;
        --source) SOURCE="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "prepare-boot.sh: unknown option $1" >&2; exit 2 ;;
        *) BOOT="$1"; shift ;;
    esac
done
if [[ -z "$BOOT" || ! -f "$BOOT/cmdline.txt" ]]; then
    echo "prepare-boot.sh: give the mounted boot partition (the folder with cmdline.txt)" >&2
    exit 2
fi

# On the Pi the boot partition is /boot/firmware (Bookworm and later).
PI_BOOT=/boot/firmware
HOOK_LINE="bash $PI_BOOT/outpost/raspberry-pi/stage.sh"

# 1. What installing needs, without tests or development leftovers (FAT has no symlinks
# or permissions; stage.sh restores the executable bits).
if [[ ! -f "$SOURCE/pyproject.toml" || ! -f "$SOURCE/deploy/install.sh" ]]; then
    echo "prepare-boot.sh: $SOURCE is not an Outpost source tree; use --source" >&2
    exit 2
fi
rm -rf "$BOOT/outpost"
mkdir -p "$BOOT/outpost"
parts=()
for part in pyproject.toml README.md LICENSE gateway drivers buffer deploy raspberry-pi; do
    if [[ -e "$SOURCE/$part" ]]; then parts+=("$part"); fi
done
tar -C "$SOURCE" --exclude='__pycache__' --exclude='*.pyc' -cf - "${parts[@]}" \
    | tar -C "$BOOT/outpost" -xf - --no-same-owner
if [[ -n "$CONFIG_SRC" ]]; then
    cp "$CONFIG_SRC" "$BOOT/outpost.toml"
fi

# 2. The hook.
if [[ -f "$BOOT/firstrun.sh" ]]; then
    if ! grep -qF "$HOOK_LINE" "$BOOT/firstrun.sh"; then
        # Imager's script ends by deleting itself; run ours just before that.
        if grep -q '^rm -f .*firstrun.sh' "$BOOT/firstrun.sh"; then
            sed -i "0,/^rm -f .*firstrun.sh/s||$HOOK_LINE\n&|" "$BOOT/firstrun.sh"
        else
            echo "prepare-boot.sh: $BOOT/firstrun.sh has an unexpected shape; add this line before its end:" >&2
            echo "  $HOOK_LINE" >&2
            exit 1
        fi
    fi
    echo "prepare-boot.sh: hooked into firstrun.sh (Bookworm)"
elif [[ -f "$BOOT/user-data" ]]; then
    if ! grep -qF "outpost/raspberry-pi/stage.sh" "$BOOT/user-data"; then
        if grep -q '^runcmd:' "$BOOT/user-data"; then
            sed -i "/^runcmd:/a\\  - [env, OUTPOST_STAGE_START=1, bash, $PI_BOOT/outpost/raspberry-pi/stage.sh]" "$BOOT/user-data"
        else
            printf '\nruncmd:\n  - [env, OUTPOST_STAGE_START=1, bash, %s/outpost/raspberry-pi/stage.sh]\n' \
                "$PI_BOOT" >> "$BOOT/user-data"
        fi
    fi
    echo "prepare-boot.sh: hooked into cloud-init user-data (Trixie and later)"
else
    echo "prepare-boot.sh: no firstrun.sh or user-data on $BOOT: write the image with Raspberry Pi" >&2
    echo "  Imager and its OS customisation (user, SSH), or install by hand over SSH:" >&2
    echo "  sudo $PI_BOOT/outpost/raspberry-pi/firstboot.sh --source $PI_BOOT/outpost" >&2
    exit 1
fi
echo "prepare-boot.sh: done; eject the card and boot the Pi with network attached"
