"""The image script against a disk image with the Raspberry Pi's partition layout.

A stand-in for Raspberry Pi OS Lite is built from the cached arm64 Bookworm root: an MBR
image with partition 1 FAT32 (`bootfs`: config.txt, cmdline.txt) and partition 2 ext4
(`rootfs`, fstab by PARTUUID as Pi OS writes it), on loop devices. (Pi OS's own image is not
fetched: no registry serves it.) raspberry-pi/build-image.sh turns it into an Outpost image;
the result is inspected partition by partition, then its root is booted with systemd-nspawn
and the boot partition bound at /boot/firmware, so that the first-boot provisioning runs
exactly as on a Pi, offline, and its effects are checked: configuration and secrets moved off
the FAT partition, root-only secrets, host name, SSH keys, the gateway running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.deploy.run import Report

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
DISK_ID = "5e3da3da"
SECRET = "OUTPOST_MQTT_PASSWORD=s3cret-from-the-boot-partition"

FIRSTBOOT_PROBE = Path(__file__).with_name("firstboot-probe.sh")

PROBE_UNIT = """\
[Unit]
Description=Outpost first-boot probe (test only)
After=outpost-firstboot.service multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/outpost-firstboot-probe
[Install]
WantedBy=multi-user.target
"""


def sh(cmd: list[str] | str, *, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), text=True, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return proc


def partitions(image: Path) -> list[dict]:
    table = json.loads(sh(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    size = table.get("sectorsize", 512)
    return [{"start": p["start"] * size, "size": p["size"] * size, "type": p["type"]} for p in table["partitions"]]


@contextlib.contextmanager
def loop(image: Path, part: dict, *, read_only: bool = False) -> Iterator[str]:
    args = ["losetup", "--find", "--show", "--offset", str(part["start"]), "--sizelimit", str(part["size"])]
    dev = sh([*args, *(["--read-only"] if read_only else []), str(image)]).stdout.strip()
    try:
        yield dev
    finally:
        sh(["losetup", "-d", dev], check=False)


def fat_extract(image: Path, part: dict, dest: Path) -> Path:
    """The FAT partition's files, copied out with mtools (this kernel may have no vfat)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    sh(["mcopy", "-s", "-n", "-i", f"{image}@@{part['start']}", "::*", str(dest)],
       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return dest


@contextlib.contextmanager
def mounted(dev: str, where: Path, *, read_only: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    sh(["mount", *(["-o", "ro"] if read_only else []), dev, str(where)])
    try:
        yield where
    finally:
        sh(["umount", str(where)], check=False)


def make_pi_image(root_tarball: Path, work: Path) -> Path:
    """An MBR image laid out like Raspberry Pi OS Lite: FAT32 bootfs at 4 MiB, ext4 rootfs after it."""
    image = work / "raspios-standin.img"
    tree = work / "rootfs-tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    sh(f"zstd -q -d -c {root_tarball} | tar -C {tree} --numeric-owner -xf -", timeout=600)
    (tree / "etc" / "fstab").write_text(
        "proc            /proc           proc    defaults          0       0\n"
        f"PARTUUID={DISK_ID}-01  /boot/firmware  vfat    defaults          0       2\n"
        f"PARTUUID={DISK_ID}-02  /               ext4    defaults,noatime  0       1\n"
    )
    (tree / "etc" / "hostname").write_text("raspberrypi\n")
    (tree / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
    boot_mib, root_mib = 256, 1280
    image.unlink(missing_ok=True)
    sh(["truncate", "-s", f"{4 + boot_mib + root_mib}M", str(image)])
    layout = (f"label: dos\nlabel-id: 0x{DISK_ID}\n"
              f"start={4 * MiB // 512}, size={boot_mib * MiB // 512}, type=c\n"
              f"start={(4 + boot_mib) * MiB // 512}, type=83\n")
    sh(["sfdisk", "--quiet", str(image)], input=layout)
    boot, rootp = partitions(image)
    with loop(image, rootp) as dev:
        sh(["mkfs.ext4", "-q", "-L", "rootfs", "-d", str(tree), dev], timeout=600)
    with loop(image, boot) as dev:
        sh(["mkfs.vfat", "-F", "32", "-n", "bootfs", dev])
    files = work / "bootfs-files"
    files.mkdir(exist_ok=True)
    (files / "config.txt").write_text(
        "# For more options and information see\n# http://rptl.io/configtxt\n"
        "dtparam=audio=on\ncamera_auto_detect=1\ndisplay_auto_detect=1\nauto_initramfs=1\n"
        "dtoverlay=vc4-kms-v3d\nmax_framebuffers=2\narm_64bit=1\n\n[cm4]\notg_mode=1\n\n[all]\n"
    )
    (files / "cmdline.txt").write_text(
        f"console=serial0,115200 console=tty1 root=PARTUUID={DISK_ID}-02 rootfstype=ext4 "
        "fsck.repair=yes rootwait\n"
    )
    sh(["mcopy", "-i", f"{image}@@{boot['start']}", str(files / "config.txt"), str(files / "cmdline.txt"), "::"],
       env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    shutil.rmtree(tree)
    return image


def run_image_test(root_tarball: Path, dist: Path, work: Path, report: Report, machine: str = "aarch64") -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (tarball,) = dist.glob(f"outpost-*-{machine}.tar.gz")
    try:
        image = make_pi_image(root_tarball, work)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        report.check("image: a Pi-layout disk image (FAT boot + ext4 root) on loop devices", False, str(exc))
        return
    parts = partitions(image)
    report.check("image: a Pi-layout disk image (FAT boot + ext4 root) on loop devices",
                 [p["type"] for p in parts] == ["c", "83"], str(parts))

    key = work / "id_test.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDeployTestKeyDeployTestKeyDeployTestKey00 field@test\n")
    from tests.deploy.run import GATEWAY_TOML

    config = work / "site.toml"
    config.write_text(GATEWAY_TOML.format(arch="pump3"))
    env = work / "site.env"
    env.write_text(SECRET + "\n")
    out = work / "outpost.img"
    script = ROOT / "raspberry-pi" / "build-image.sh"
    proc = sh([str(script), "--image", str(image), "--dist", str(tarball), "--output", str(out),
               "--hostname", "pump3", "--user", "field", "--ssh-key", str(key), "--config", str(config),
               "--env", str(env), "--rs485", "sc16is752"], check=False, timeout=600)
    if not report.check("image: build-image.sh makes an Outpost image", proc.returncode == 0,
                        proc.stdout + proc.stderr):
        return
    inspect(out, report, machine)

    ro = work / "outpost-ro.img"
    proc = sh([str(script), "--image", str(image), "--dist", str(tarball), "--output", str(ro),
               "--rs485", "uart", "--read-only-root", "--data-size", "64M"], check=False, timeout=600)
    if report.check("image: build-image.sh --read-only-root --rs485 uart", proc.returncode == 0,
                    proc.stdout + proc.stderr):
        inspect_read_only(ro, report)
        ro.unlink()

    first_boot(out, work, report)


def inspect(image: Path, report: Report, machine: str) -> None:
    boot, rootp = partitions(image)
    b = fat_extract(image, boot, image.parent / "fat-files")
    with loop(image, rootp, read_only=True) as rdev, mounted(rdev, image.parent / "mnt-r", read_only=True) as r:
        dists = list((r / "opt" / "outpost" / "dist").glob(f"outpost-*-{machine}"))
        report.check("image: the release (wheelhouse + installer) is in /opt/outpost/dist",
                     len(dists) == 1 and (dists[0] / "wheelhouse" / "requirements.txt").exists()
                     and os.access(dists[0] / "deploy" / "install.sh", os.X_OK), str(dists))
        wants = r / "etc" / "systemd" / "system" / "multi-user.target.wants"
        report.check("image: outpost-firstboot.service is enabled",
                     (wants / "outpost-firstboot.service").is_symlink()
                     and (r / "opt" / "outpost" / "raspberry-pi" / "firstboot.sh").exists(), str(list(wants.iterdir())))
        timesync = (r / "etc" / "systemd" / "system" / "sysinit.target.wants" / "systemd-timesyncd.service")
        report.check("image: systemd-timesyncd is enabled", timesync.is_symlink(), str(timesync))
        wd = (r / "etc" / "systemd" / "system.conf.d" / "outpost-watchdog.conf").read_text()
        config_txt = (b / "config.txt").read_text()
        report.check("image: hardware watchdog (dtparam=watchdog=on, RuntimeWatchdogSec)",
                     "RuntimeWatchdogSec=15s" in wd and "\ndtparam=watchdog=on\n" in config_txt, config_txt[-600:])
        report.check("image: the SC16IS752 RS-485 HAT overlay", "dtoverlay=sc16is752-spi1,int_pin=24" in config_txt
                     and "dtparam=spi=on" in config_txt and config_txt.count("# >>> outpost >>>") == 1)
        journald = (r / "etc" / "systemd" / "journald.conf.d" / "outpost.conf").read_text()
        report.check("image: journald sized for an SD card", "SystemMaxUse=64M" in journald
                     and "SyncIntervalSec" not in journald.split("[Journal]")[1])
        prov = b / "outpost"
        settings = (prov / "settings.conf").read_text()
        report.check("image: provisioning folder on the boot partition",
                     "hostname=pump3" in settings and "user=field" in settings
                     and (prov / "outpost.toml").exists() and (prov / "outpost.env").exists()
                     and (prov / "authorized_keys").exists() and (prov / "outpost.toml.example").exists(),
                     settings)


def inspect_read_only(image: Path, report: Report) -> None:
    parts = partitions(image)
    if not report.check("image (read-only root): a third partition for the data", len(parts) == 3, str(parts)):
        return
    boot, rootp, data = parts
    with loop(image, data, read_only=True) as ddev:
        label = sh(["blkid", "-o", "value", "-s", "LABEL", ddev], check=False).stdout.strip()
        fstype = sh(["blkid", "-o", "value", "-s", "TYPE", ddev], check=False).stdout.strip()
    report.check("image (read-only root): partition 3 is ext4 LABEL=outpost-data",
                 label == "outpost-data" and fstype == "ext4", f"{label} {fstype}")
    b = fat_extract(image, boot, image.parent / "fat-files")
    with loop(image, rootp, read_only=True) as rdev, mounted(rdev, image.parent / "mnt-r", read_only=True) as r:
        fstab = (r / "etc" / "fstab").read_text()
        root_line = next(f for f in (line.split() for line in fstab.splitlines()) if len(f) > 3 and f[1] == "/")
        report.check("image (read-only root): / is ro, the buffer on the data partition, logs in RAM",
                     "ro" in root_line[3].split(",") and "LABEL=outpost-data\t/var/lib/outpost\text4" in fstab
                     and "tmpfs\t/var/log" in fstab, fstab)
        cmdline = (b / "cmdline.txt").read_text()
        config_txt = (b / "config.txt").read_text()
        report.check("image (uart RS-485): PL011 freed, no serial console",
                     "enable_uart=1" in config_txt and "dtoverlay=disable-bt" in config_txt
                     and "console=serial0" not in cmdline and "console=tty1" in cmdline, cmdline + config_txt[-300:])


def first_boot(image: Path, work: Path, report: Report) -> None:
    boot, rootp = partitions(image)
    r = work / "boot-root"
    # The boot partition's files in a directory bound at /boot/firmware: a stand-in for the
    # vfat mount Pi OS makes (this kernel has no vfat; the files are the image's own).
    b = fat_extract(image, boot, work / "boot-fat")
    empty_fstab = work / "fstab.empty"
    empty_fstab.write_text("# the container has no block devices\n")
    with loop(image, rootp) as rdev, mounted(rdev, r):
        try:
            _first_boot(r, b, empty_fstab, report)
        finally:
            for leftover in ("etc/systemd/system/multi-user.target.wants/outpost-firstboot-probe.service",
                             "etc/systemd/system/outpost-firstboot-probe.service",
                             "usr/local/sbin/outpost-firstboot-probe"):
                with contextlib.suppress(FileNotFoundError):
                    (r / leftover).unlink()


def _first_boot(r: Path, b: Path, empty_fstab: Path, report: Report) -> None:
    probe = r / "usr" / "local" / "sbin" / "outpost-firstboot-probe"
    shutil.copy2(FIRSTBOOT_PROBE, probe)
    probe.chmod(0o755)
    unit = r / "etc" / "systemd" / "system" / "outpost-firstboot-probe.service"
    unit.write_text(PROBE_UNIT)
    wants = r / "etc" / "systemd" / "system" / "multi-user.target.wants" / unit.name
    wants.symlink_to(f"/etc/systemd/system/{unit.name}")
    start = time.monotonic()
    proc = sh(["systemd-nspawn", "--quiet", "--directory", str(r), "--boot", "--private-network",
               "--register=no", "--keep-unit", "--console=pipe", f"--bind={b}:/boot/firmware",
               f"--bind-ro={empty_fstab}:/etc/fstab"], check=False, timeout=900, stdin=subprocess.DEVNULL)
    result_file = r / "root" / "firstboot-probe.json"
    if not report.check("image: first boot (systemd-nspawn --boot of the image's root, offline)",
                        result_file.exists(), f"nspawn exit {proc.returncode}\n{proc.stdout[-3000:]}"):
        return
    report.figure("image_first_boot_s", round(time.monotonic() - start))
    result = json.loads(result_file.read_text())
    journal = (r / "root" / "firstboot-journal.txt").read_text(errors="replace")
    report.check("image: first boot installs offline and the gateway delivers samples",
                 result["delivered"] and result["active"] == "active" and result["firstboot"] == "active",
                 json.dumps(result) + "\n" + journal[-2500:])
    prov = b / "outpost"
    left = sorted(p.name for p in prov.iterdir())
    report.check("image: configuration, secrets and SSH keys are removed from the FAT partition",
                 not {"outpost.toml", "outpost.env", "authorized_keys"} & set(left), str(left))
    envf = r / "etc" / "outpost" / "outpost.env"
    st = envf.stat() if envf.exists() else None
    report.check("image: secrets in /etc/outpost/outpost.env, root:root 0600",
                 st is not None and envf.read_text().strip() == SECRET and st.st_uid == 0 and st.st_gid == 0
                 and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode) if st else "missing")
    report.check("image: host name from settings.conf", (r / "etc" / "hostname").read_text().strip() == "pump3")
    group = (r / "etc" / "group").read_text().splitlines()
    outpost_members = next((g.split(":")[3] for g in group if g.startswith("outpost:")), "?")
    keys = r / "home" / "field" / ".ssh" / "authorized_keys"
    sshd_conf = r / "etc" / "ssh" / "sshd_config.d" / "outpost.conf"
    sshd = sshd_conf.read_text() if sshd_conf.exists() else ""
    report.check("image: login user with SSH keys only, in no Outpost group",
                 keys.exists() and "ssh-ed25519" in keys.read_text() and "PasswordAuthentication no" in sshd
                 and "field" not in outpost_members.split(","), f"outpost group members: {outpost_members!r}")
