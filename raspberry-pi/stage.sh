#!/usr/bin/env bash
# First-boot stage that needs no network: called from Imager's firstrun.sh or cloud-init
# (hooked in by prepare-boot.sh). Copies the Outpost source from the boot partition to
# /opt/outpost/src and enables outpost-firstboot.service, which does the real work once
# the network is up.
set -euo pipefail
BOOT_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
install -d -m 0755 /opt/outpost
rm -rf /opt/outpost/src
cp -r "$BOOT_SRC" /opt/outpost/src
chmod +x /opt/outpost/src/deploy/install.sh /opt/outpost/src/raspberry-pi/*.sh
install -m 0644 /opt/outpost/src/raspberry-pi/outpost-firstboot.service /etc/systemd/system/
systemctl enable outpost-firstboot.service
if [[ "${OUTPOST_STAGE_START:-0}" == 1 ]]; then
    # cloud-init runs us late in a normal boot: start now rather than after a reboot.
    systemctl start --no-block outpost-firstboot.service
fi
