"""The systemd unit, the installer and the Raspberry Pi scripts: syntax, settings, behaviour."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.cli import EXIT_CONFIG
from gateway.diagnostics.doctor import DevicePolicy, check_device_policy, load_device_policy

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "outpost.service"
SCRIPTS = [
    ROOT / "deploy" / "install.sh",
    ROOT / "raspberry-pi" / "firstboot.sh",
    ROOT / "raspberry-pi" / "build-image.sh",
    ROOT / "tests" / "deploy" / "probe.sh",
    ROOT / "tests" / "deploy" / "firstboot-probe.sh",
]


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    if "probe" not in script.name:  # the test probes record failures instead of stopping at one
        assert "set -euo pipefail" in script.read_text()


def test_unit_has_the_settings_the_gateway_relies_on() -> None:
    s = unit_settings(UNIT)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30s"] and s["Restart"] == ["always"]
    assert s["User"] == ["outpost"] and s["SupplementaryGroups"] == ["dialout"]
    assert s["StateDirectory"] == ["outpost"] and s["RuntimeDirectory"] == ["outpost"]
    assert s["ExecStart"] == ["/opt/outpost/venv/bin/outpost run --config /etc/outpost/outpost.toml"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    # Serial adapters must stay reachable under the device policy.
    assert s["DevicePolicy"] == ["closed"]
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw", "char-ttyS rw", "char-ttySC rw"} <= set(
        s["DeviceAllow"]
    )
    assert "PrivateDevices" not in s
    # Validate before reloading: the check runs before the SIGHUP.
    check = "/opt/outpost/venv/bin/outpost check --config /etc/outpost/outpost.toml"
    assert s["ExecReload"] == [check, "/bin/kill -HUP $MAINPID"]
    # No crash loop on an invalid configuration: `outpost run` exits 2 and that stops the
    # restarts; a failing ExecStartPre would be retried forever (test-deploy shows it).
    assert s["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert "ExecStartPre" not in s
    assert f'"$EXIT_STATUS" = {EXIT_CONFIG}' in s["ExecStopPost"][0] and "<3>" in s["ExecStopPost"][0]
    assert s["SyslogLevelPrefix"] == ["yes"]
    assert s["EnvironmentFile"] == ["-/etc/outpost/outpost.env"]
    # ProtectClock=yes would make adjtimex() fail and hide clock sync state.
    assert "ProtectClock" not in s
    assert "adjtimex clock_adjtime" in s["SystemCallFilter"]
    # The default socket path of the status server lives in the RuntimeDirectory.
    assert "/run/outpost/" in (ROOT / "gateway" / "config.py").read_text()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the `systemd` package (Debian)")
    # verify also checks that ExecStart exists; point it at a real executable.
    text = UNIT.read_text().replace("/opt/outpost/venv/bin/outpost", shutil.which("true") or "/bin/true")
    unit = tmp_path / "outpost.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys are only warnings for systemd; they are errors for us.
    assert "Unknown" not in proc.stderr and "ignoring" not in proc.stderr, proc.stderr

    sec = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for outpost\.service: ([0-9.]+)", sec.stdout + sec.stderr)
    assert match, sec.stdout + sec.stderr
    assert float(match.group(1)) <= 3.0, sec.stdout


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install the `systemd` package (Debian)")
    text = UNIT.read_text().replace("/opt/outpost/venv/bin/outpost", shutil.which("true") or "/bin/true")
    unit = tmp_path / "outpost.service"
    unit.write_text(text.replace("WatchdogSec=30s", "WatchdogSecs=30s"))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in proc.stderr


def test_installer_dry_run_creates_user_venv_config_and_unit() -> None:
    proc = subprocess.run(
        [str(ROOT / "deploy" / "install.sh"), "--dry-run", "--prefix", "/opt/outpost-test"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    out = proc.stdout
    lines = [line for line in out.splitlines() if line.startswith("+ ")]
    assert any("useradd --system" in line and "--groups dialout" in line for line in lines) or any(
        "usermod --append --groups dialout outpost" in line for line in lines
    )
    assert "+ python3 -m venv /opt/outpost-test/venv" in lines
    pip = "+ /opt/outpost-test/venv/bin/python -m pip --disable-pip-version-check --no-input install --quiet"
    # Locked, hash-checked dependencies, then Outpost itself; never a pip self-upgrade.
    assert f"{pip} --no-deps --require-hashes -r {ROOT}/deploy/requirements.lock" in lines
    assert f"{pip} --no-deps --force-reinstall {ROOT}" in lines
    assert not any("--upgrade pip" in line for line in lines)
    # Secrets: root-only, read by systemd, not by the outpost group.
    assert any(line.endswith("/etc/outpost/outpost.env") and "-m 0600 -o root -g root" in line for line in lines) or (
        "+ chmod 0600 /etc/outpost/outpost.env" in lines
    )
    assert f"+ install -m 0644 {ROOT}/deploy/systemd/outpost.service /etc/systemd/system/outpost.service" in lines
    assert "+ install -d -m 0750 -o root -g outpost /etc/outpost" in lines
    # The service is (re)started only after the configuration validated.
    check = lines.index("+ /opt/outpost-test/venv/bin/outpost check /etc/outpost/outpost.toml")
    assert lines.index("+ systemctl restart outpost.service") > check
    assert lines.index("+ systemctl enable outpost.service") > lines.index("+ systemctl daemon-reload")


def test_installer_refuses_a_directory_that_is_not_outpost(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(ROOT / "deploy" / "install.sh"), "--dry-run", "--source", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "pyproject.toml" in proc.stderr


def test_journald_drop_in_caps_the_journal_and_sets_no_default() -> None:
    conf = (ROOT / "raspberry-pi" / "files" / "journald-outpost.conf").read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith(("#", "["))]
    settings = dict(line.split("=", 1) for line in lines)
    assert settings["SystemMaxUse"] == "64M" and settings["Storage"] == "persistent"
    # journald's defaults (SyncIntervalSec=5m, RateLimitIntervalSec=30s) are not restated as if
    # they were changes; its sync happens at once only for crit/alert/emerg, not warnings.
    assert "SyncIntervalSec" not in settings and "RateLimitIntervalSec" not in settings
    assert "warnings and worse" not in conf
    firstboot = (ROOT / "raspberry-pi" / "firstboot.sh").read_text()
    assert "files/journald-outpost.conf" in firstboot and "systemd-timesyncd" in firstboot


def test_firstboot_moves_configuration_and_secrets_off_the_boot_partition() -> None:
    """The order of the steps; their effect is checked by the first boot in `make test-deploy`."""
    text = (ROOT / "raspberry-pi" / "firstboot.sh").read_text()
    # Secrets are installed root-only before the FAT copies are overwritten and removed.
    assert text.index("install -m 0600 -o root -g root /dev/null /etc/outpost/outpost.env.new") < text.index(
        'rm -f "$BOOT_DIR/$f"')
    assert "for f in outpost.toml outpost.env authorized_keys" in text
    # The login user joins no Outpost group.
    assert "--groups outpost" not in text and "-aG outpost" not in text
    # settings.conf is parsed, never sourced.
    assert "source " not in text and ". \"$BOOT_DIR" not in text


def test_build_image_refuses_what_is_not_a_pi_image(tmp_path: Path) -> None:
    script = ROOT / "raspberry-pi" / "build-image.sh"
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 4096)
    dist = tmp_path / "outpost-0.1.0-aarch64.tar.gz"
    dist.write_bytes(b"")
    proc = subprocess.run([str(script), "--image", str(img), "--dist", str(dist), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "make dist" in proc.stderr
    proc = subprocess.run([str(script), "--image", str(img), "--dist", str(dist), "--output", "o", "--rs485", "rs232"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--rs485" in proc.stderr


# --- the unit's device policy, as `outpost doctor` checks it ---------------------------

PROC_DEVICES = """Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
  4 ttyS
  5 /dev/tty
136 pts
188 ttyUSB
204 ttyAMA
240 ttySC

Block devices:
  7 loop
"""


@pytest.fixture
def pty_path() -> object:
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_the_shipped_unit_allows_every_serial_driver_the_gateway_supports() -> None:
    policy = load_device_policy(str(UNIT))
    assert policy is not None and policy.policy == "closed"
    allowed = {dev for dev, access in policy.allow if "rw" in access}
    for driver in ("ttyUSB", "ttyACM", "ttyAMA", "ttyS", "ttySC"):
        assert f"char-{driver}" in allowed


def test_device_policy_check_refuses_a_hat_the_unit_does_not_allow(tmp_path: Path, pty_path: str) -> None:
    # A pty stands in for the port; the fake /proc/devices says its major is the SC16IS7xx driver.
    major = os.major(os.stat(pty_path).st_rdev)
    proc = PROC_DEVICES.replace("136 pts", f"{major} ttySC")
    old = tmp_path / "old.service"
    old.write_text("[Service]\nDevicePolicy=strict\nDeviceAllow=char-ttyUSB rw\nDeviceAllow=char-ttyAMA rw\n")
    check = check_device_policy(pty_path, load_device_policy(str(old)), proc_devices=proc)
    assert not check.ok
    assert "ttySC" in check.detail and "DeviceAllow=char-ttySC rw" in check.hint
    # The shipped unit lets it through.
    check = check_device_policy(pty_path, load_device_policy(str(UNIT)), proc_devices=proc)
    assert check.ok and "char-ttySC" in check.detail


def test_device_policy_drop_ins_add_and_reset(tmp_path: Path, pty_path: str) -> None:
    major = os.major(os.stat(pty_path).st_rdev)
    proc = PROC_DEVICES.replace("136 pts", f"{major} ttyXR")  # a driver nobody listed
    unit = tmp_path / "outpost.service"
    unit.write_text("[Service]\nDevicePolicy=closed\nDeviceAllow=char-ttyUSB rw\n")
    assert not check_device_policy(pty_path, load_device_policy(str(unit)), proc_devices=proc).ok
    dropins = tmp_path / "outpost.service.d"
    dropins.mkdir()
    (dropins / "xr.conf").write_text("[Service]\nDeviceAllow=char-ttyXR rw\n")
    assert check_device_policy(pty_path, load_device_policy(str(unit)), proc_devices=proc).ok
    # Read-only access is not enough for a Modbus master.
    (dropins / "xr.conf").write_text("[Service]\nDeviceAllow=\nDeviceAllow=char-ttyXR r\n")
    policy = load_device_policy(str(unit))
    assert policy.allow == (("char-ttyXR", "r"),)
    assert not check_device_policy(pty_path, policy, proc_devices=proc).ok
    # A node allowed by path (same major:minor) passes; no unit at all is not checked.
    by_path = DevicePolicy("x", "strict", ((pty_path, "rw"),))
    assert check_device_policy(pty_path, by_path, proc_devices=proc).ok
    assert load_device_policy(str(tmp_path / "absent.service")) is None
    assert check_device_policy(pty_path, DevicePolicy("x"), proc_devices=proc).ok


def test_ptys_pass_closed_policy_as_systemd_allows_char_pts(pty_path: str) -> None:
    proc = PROC_DEVICES.replace("136 pts", f"{os.major(os.stat(pty_path).st_rdev)} pts")
    policy = DevicePolicy("x", "closed", (("char-ttyUSB", "rw"),))
    assert check_device_policy(pty_path, policy, proc_devices=proc).ok
    assert not check_device_policy(pty_path, DevicePolicy("x", "strict", policy.allow), proc_devices=proc).ok
