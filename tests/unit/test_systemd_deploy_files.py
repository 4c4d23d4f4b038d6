"""The systemd unit, the installer and the Raspberry Pi scripts: syntax, settings, behaviour."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "outpost.service"
SCRIPTS = [
    ROOT / "deploy" / "install.sh",
    ROOT / "raspberry-pi" / "firstboot.sh",
    ROOT / "raspberry-pi" / "prepare-boot.sh",
    ROOT / "raspberry-pi" / "stage.sh",
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
    assert {"char-ttyUSB rw", "char-ttyACM rw"} <= set(s["DeviceAllow"])
    assert "PrivateDevices" not in s
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
    assert f"+ /opt/outpost-test/venv/bin/pip install --quiet --upgrade {ROOT}" in lines
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


def fake_boot(tmp_path: Path) -> Path:
    boot = tmp_path / "bootfs"
    boot.mkdir(parents=True)
    (boot / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=1234-02 rootwait\n")
    return boot


def source_tree(tmp_path: Path) -> Path:
    """A small stand-in for the checkout (the real one is being edited while tests run)."""
    src = tmp_path / "src"
    if not src.exists():
        for rel in ("pyproject.toml", "README.md", "gateway/__init__.py", "drivers/__init__.py",
                    "buffer/__init__.py", "deploy/install.sh", "deploy/systemd/outpost.service",
                    "raspberry-pi/stage.sh", "raspberry-pi/firstboot.sh"):
            target = src / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, target)
        (src / ".venv" / "bin").mkdir(parents=True)
        (src / "tests").mkdir()
        (src / "gateway" / "__pycache__").mkdir()
    return src


def prepare(boot: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "raspberry-pi" / "prepare-boot.sh"), str(boot),
         "--source", str(source_tree(boot.parent)), *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_prepare_boot_hooks_into_imagers_firstrun_before_it_deletes_itself(tmp_path: Path) -> None:
    boot = fake_boot(tmp_path)
    (boot / "firstrun.sh").write_text(
        "#!/bin/bash\nset +e\nsystemctl enable ssh\nrm -f /boot/firmware/firstrun.sh\n"
        "sed -i 's| systemd.run.*||g' /boot/firmware/cmdline.txt\nexit 0\n"
    )
    config = tmp_path / "site.toml"
    config.write_text("[gateway]\n")
    for _ in range(2):  # idempotent
        proc = prepare(boot, "--config", str(config))
        assert proc.returncode == 0, proc.stderr
    lines = (boot / "firstrun.sh").read_text().splitlines()
    hook = "bash /boot/firmware/outpost/raspberry-pi/stage.sh"
    assert lines.count(hook) == 1
    assert lines.index(hook) == lines.index("rm -f /boot/firmware/firstrun.sh") - 1
    assert (boot / "outpost.toml").read_text() == "[gateway]\n"
    assert (boot / "outpost" / "raspberry-pi" / "stage.sh").exists()
    assert (boot / "outpost" / "deploy" / "install.sh").exists()
    assert (boot / "outpost" / "pyproject.toml").exists()
    assert (boot / "outpost" / "gateway" / "__init__.py").exists()
    assert not (boot / "outpost" / ".venv").exists()
    assert not (boot / "outpost" / "tests").exists()
    assert not (boot / "outpost" / "gateway" / "__pycache__").exists()


def test_prepare_boot_adds_a_cloud_init_runcmd(tmp_path: Path) -> None:
    boot = fake_boot(tmp_path)
    (boot / "user-data").write_text("#cloud-config\nhostname: pump3\nruncmd:\n  - [echo, hi]\n")
    assert prepare(boot).returncode == 0
    assert prepare(boot).returncode == 0
    text = (boot / "user-data").read_text()
    assert text.count("outpost/raspberry-pi/stage.sh") == 1
    assert text.count("runcmd:") == 1
    assert "  - [env, OUTPOST_STAGE_START=1, bash, /boot/firmware/outpost/raspberry-pi/stage.sh]" in text

    boot2 = fake_boot(tmp_path / "b2")
    (boot2 / "user-data").write_text("#cloud-config\nhostname: pump4\n")
    assert prepare(boot2).returncode == 0
    assert (boot2 / "user-data").read_text().endswith(
        "runcmd:\n  - [env, OUTPOST_STAGE_START=1, bash, /boot/firmware/outpost/raspberry-pi/stage.sh]\n"
    )


def test_prepare_boot_without_a_hook_explains_the_manual_route(tmp_path: Path) -> None:
    proc = prepare(fake_boot(tmp_path))
    assert proc.returncode == 1 and "firstboot.sh" in proc.stderr
    assert prepare(tmp_path / "nowhere").returncode == 2
    not_source = subprocess.run(
        [str(ROOT / "raspberry-pi" / "prepare-boot.sh"), str(fake_boot(tmp_path / "b3")), "--source", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert not_source.returncode == 2 and "not an Outpost source tree" in not_source.stderr


def test_firstboot_limits_journald_and_enables_ntp() -> None:
    text = (ROOT / "raspberry-pi" / "firstboot.sh").read_text()
    assert "SystemMaxUse=64M" in text and "SyncIntervalSec=5m" in text
    assert "timedatectl set-ntp true" in text and "systemd-timesyncd" in text
    assert "deploy/install.sh" in text and "systemctl enable outpost.service" in text
