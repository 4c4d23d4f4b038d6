"""`make test-deploy`: the release tarballs installed offline in emulated Debian Bookworm roots.

    sudo .venv/bin/python -m tests.deploy [--arch arm64 --arch armhf] [--skip-image] [--json FILE]

For each architecture (arm64 = Pi 3/4/5 on 64-bit Pi OS; armhf = armv7 on 32-bit Pi OS):
  1. a Debian Bookworm root made by debootstrap under qemu-user-static (cached as a tarball in
     ~/.cache/outpost/roots, so only the first run downloads), with python3, python3-venv,
     systemd and mosquitto from Debian;
  2. the architecture's tarball from deploy/build_dist.py installed with the network cut off
     (a new network namespace holding only `lo`), timed, and its installed size measured;
  3. `outpost check` on every example configuration, and a broken one refused with exit 2;
  4. the gateway run as the `outpost` user with a simulator device, the root's own Mosquitto
     on loopback (inside the same offline namespace) and a Kafka uplink that is down:
     `outpost status --json` must show samples acknowledged by MQTT and buffered for Kafka;
     on armhf the pure-Python aiokafka wheel is also checked to be the one in use, and to
     round-trip a zstd record batch;
  5. `systemd-analyze verify` of the installed unit inside the root, then the root booted
     with `systemd-nspawn --boot` (private network): the unit is started for real and a probe
     inside checks notify, the status line, reload (valid and rejected), the watchdog (a
     SIGSTOPped gateway is restarted), no restart loop on an invalid file, and stop;
  6. an upgrade to a newer build (configuration, secrets and buffer kept), then an uninstall
     (configuration and buffer kept);
  7. the Sparkplug benchmark under emulation (figures reported, not asserted).
Then the image script is run against a disk image with the Pi's partition layout (FAT boot +
ext4 root on loop devices) and the result is inspected, and booted once with nspawn for the
first-boot provisioning.

Every step is a named check; the last line is `N passed, N failed`. Exit 0 only if none failed.
Needs root, qemu-user-static, binfmt-support, debootstrap, systemd-container, dosfstools,
parted, e2fsprogs, zstd (.ci/run installs them).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("OUTPOST_CACHE", Path.home() / ".cache" / "outpost"))
ROOTS = CACHE / "roots"
WORK = Path(os.environ.get("OUTPOST_DEPLOY_WORK", "/var/tmp/outpost-test-deploy"))
MIRROR = os.environ.get("OUTPOST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Bump ROOT_REVISION when the package list changes: the cached tarball is then rebuilt.
ROOT_PACKAGES = ("systemd", "systemd-sysv", "systemd-timesyncd", "dbus", "python3", "python3-venv", "mosquitto",
                 "mosquitto-clients", "ca-certificates", "procps", "iproute2")
ROOT_REVISION = "2"
ARCHES = {"arm64": ("aarch64", "qemu-aarch64"), "armhf": ("armv7l", "qemu-arm")}
UPGRADE_VERSION = "0.1.0.post1"


# ----------------------------------------------------------------------------- results


@dataclass
class Report:
    results: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        line = f"{'PASS' if ok else 'FAIL'} {name}"
        if detail and (not ok or len(detail) < 160):
            line += f": {detail}" if ok else f"\n    {detail[-3000:]}".replace("\n", "\n    ")
        print(line, flush=True)
        return ok

    def figure(self, key: str, value: object) -> None:
        self.figures[key] = value
        print(f"  figure {key} = {value}", flush=True)

    @property
    def failed(self) -> int:
        return sum(1 for _, ok, _ in self.results if not ok)


def sh(cmd: list[str] | str, *, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), text=True, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise StepError(f"{cmd if isinstance(cmd, str) else ' '.join(cmd)} exited {proc.returncode}\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


class StepError(Exception):
    pass


# ----------------------------------------------------------------------------- host set-up


def ensure_binfmt(report: Report) -> bool:
    mnt = Path("/proc/sys/fs/binfmt_misc")
    if not (mnt / "status").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(mnt)], check=False)
    problems = []
    for _, (_, name) in ARCHES.items():
        sh(["update-binfmts", "--enable", name], check=False)
        entry = mnt / name
        if not entry.exists() or "enabled" not in entry.read_text():
            problems.append(f"{name} not registered (install qemu-user-static binfmt-support)")
        elif "flags: " in entry.read_text() and "F" not in entry.read_text().split("flags: ")[1].split()[0]:
            problems.append(f"{name} registered without the F flag: chroots would not find qemu")
    return report.check("binfmt: qemu-user-static registered for arm64 and armhf", not problems, "; ".join(problems))


def cached_root(arch: str, report: Report) -> Path | None:
    """The root tarball for `arch`, made once by debootstrap and kept in ~/.cache/outpost/roots."""
    key = hashlib.sha256(f"{ROOT_REVISION} {','.join(ROOT_PACKAGES)}".encode()).hexdigest()[:10]
    tarball = ROOTS / f"bookworm-{arch}-{key}.tar.zst"
    if tarball.exists():
        return tarball
    ROOTS.mkdir(parents=True, exist_ok=True)
    build = WORK / f"debootstrap-{arch}"
    remove_tree(build)
    start = time.monotonic()
    proc = sh(["debootstrap", f"--arch={arch}", "--variant=minbase", f"--include={','.join(ROOT_PACKAGES)}",
               "bookworm", str(build), MIRROR], check=False, timeout=1800)
    if not report.check(f"{arch}: debootstrap Debian Bookworm root", proc.returncode == 0,
                        proc.stdout[-1500:] + proc.stderr[-1500:]):
        return None
    # apt's downloaded .debs are not needed in the root; keep the cache small.
    for deb in (build / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    partial = tarball.with_suffix(".partial")
    sh(f"tar -C {build} --numeric-owner -cf - . | zstd -q -T0 -3 -o {partial}", timeout=900)
    partial.rename(tarball)
    remove_tree(build)
    report.figure(f"{arch}_debootstrap_s", round(time.monotonic() - start))
    return tarball


def build_dists(report: Report, arches: list[str]) -> tuple[Path, Path] | None:
    """The release tarballs (`make dist` output) and an upgrade build with a newer version."""
    python = os.environ.get("OUTPOST_BUILD_PYTHON", str(CACHE / "build-venv" / "bin" / "python"))
    targets = [a for arch in arches for a in ("--arch", ARCHES[arch][0])]
    out, upgrade = WORK / "dist", WORK / "dist-upgrade"
    for d in (out, upgrade):
        shutil.rmtree(d, ignore_errors=True)
    first = sh([python, str(ROOT / "deploy" / "build_dist.py"), *targets, "--out", str(out)], check=False)
    second = sh([python, str(ROOT / "deploy" / "build_dist.py"), *targets, "--out", str(upgrade),
                 "--version", UPGRADE_VERSION], check=False)
    ok = first.returncode == 0 and second.returncode == 0
    report.check("make dist: tarballs for " + ", ".join(ARCHES[a][0] for a in arches), ok,
                 first.stdout + first.stderr + second.stderr)
    return (out, upgrade) if ok else None


# ----------------------------------------------------------------------------- running in a root


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev in the root for chroot steps; always unmounted again."""
    done: list[Path] = []
    try:
        for src, dst, args in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                               ("/dev", "dev", ["--rbind"])):
            target = root / dst
            target.mkdir(exist_ok=True)
            sh(["mount", *args, src, str(target)])
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            sh(["umount", "-R", "-l", str(target)], check=False)


def offline(root: Path, script: str, *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a bash script in the root inside a new network namespace: only `lo`, no route out.

    A new PID namespace too: whatever the script leaves running (a broker, a gateway) is
    killed with it, by the kernel, when the script ends.
    """
    body = "set -euo pipefail\nip link set lo up\n" + textwrap.dedent(script)
    return sh(["unshare", "--net", "--pid", "--fork", "--kill-child", "chroot", str(root), "/bin/bash", "-c", body],
              check=False, timeout=timeout)


GATEWAY_TOML = """\
[gateway]
group_id = "deploytest"
edge_node_id = "{arch}"
data_dir = "/var/lib/outpost"

[[devices]]
name = "sim1"
driver = "simulator"
interval = "500ms"
  [[devices.points]]
  name = "level"
  waveform = "counter"

[mqtt]
servers = ["mqtt://127.0.0.1:1883"]
reconnect_max = "2s"

[kafka]
# Nothing listens here: the Kafka link stays down and its records wait in the buffer.
bootstrap_servers = ["127.0.0.1:9"]
reconnect_max = "5s"
[[kafka.mappings]]
mqtt_topic_filters = ["spBv1.0/#"]
kafka_topic = "telemetry"
"""

PURE_AIOKAFKA = """\
import pathlib
import aiokafka
from aiokafka.record import default_records as d
native = list(pathlib.Path(aiokafka.__file__).parent.glob("record/_crecords/*.so"))
assert not native, native
assert d.DefaultRecordBatchBuilder is d._DefaultRecordBatchBuilderPy, d.DefaultRecordBatchBuilder
b = d.DefaultRecordBatchBuilder(magic=2, compression_type=d.DefaultRecordBatch.CODEC_ZSTD,
    is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
for i in range(100):
    b.append(i, timestamp=1_700_000_000_000 + i, key=b"sim1", value=b"v%d" % i, headers=[("outpost-seq", b"%d" % i)])
buf = bytes(b.build())
batch = d.DefaultRecordBatch(buf)
assert batch.validate_crc()
values = [r.value for r in batch]
assert values == [b"v%d" % i for i in range(100)], values[:3]
print("pure aiokafka ok: 100 records, zstd, crc valid,", len(buf), "bytes")
"""


def install_and_exercise(arch: str, root: Path, dist: Path, upgrade: Path, report: Report, bench_s: float) -> None:
    machine = ARCHES[arch][0]
    for src, name in ((dist, "new"), (upgrade, "upgrade")):
        (tarball,) = src.glob(f"outpost-*-{machine}.tar.gz")
        dest = root / "srv" / name
        dest.mkdir(parents=True, exist_ok=True)
        sh(["tar", "-xzf", str(tarball), "-C", str(dest)])
    new = "/srv/new/" + next((root / "srv" / "new").iterdir()).name
    upg = "/srv/upgrade/" + next((root / "srv" / "upgrade").iterdir()).name
    (root / "srv" / "gateway.toml").write_text(GATEWAY_TOML.format(arch=arch))
    (root / "srv" / "broken.toml").write_text(GATEWAY_TOML.format(arch=arch).replace('interval = "500ms"',
                                                                                      'interval = "soon"'))
    (root / "srv" / "pure_aiokafka.py").write_text(PURE_AIOKAFKA)
    bench = root / "srv" / "bench" / "tests" / "benchmarks"
    bench.mkdir(parents=True, exist_ok=True)
    for init in (bench.parent / "__init__.py", bench / "__init__.py"):
        init.write_text("")
    shutil.copy2(ROOT / "tests" / "benchmarks" / "sparkplug.py", bench / "sparkplug.py")

    with mounted(root):
        # 2. Offline install.
        start = time.monotonic()
        proc = offline(root, f"""
            links="$(ip -o link show | awk -F': ' '{{print $2}}')"
            test "$links" = lo || {{ echo "not offline: $links"; exit 9; }}
            ip route get 1.1.1.1 2>/dev/null && {{ echo "a route out exists"; exit 9; }}
            {new}/deploy/install.sh --no-start
            """)
        elapsed = time.monotonic() - start
        if not report.check(f"{arch}: offline install from the wheelhouse (network namespace with lo only)",
                            proc.returncode == 0, proc.stdout + proc.stderr):
            return
        report.figure(f"{arch}_install_s", round(elapsed, 1))
        size = sh(["du", "-sk", str(root / "opt" / "outpost")]).stdout.split()[0]
        report.figure(f"{arch}_installed_mib", round(int(size) / 1024, 1))
        env = (root / "etc" / "outpost" / "outpost.env").stat()
        report.check(f"{arch}: outpost.env is root:root 0600",
                     env.st_uid == 0 and env.st_gid == 0 and (env.st_mode & 0o777) == 0o600, oct(env.st_mode))
        proc = offline(root, "outpost --version; /opt/outpost/venv/bin/python -c "
                             "'import platform; print(platform.machine())'")
        report.check(f"{arch}: `outpost --version` runs as {machine}",
                     proc.returncode == 0 and machine in proc.stdout and "0.1.0" in proc.stdout,
                     proc.stdout + proc.stderr)
        proc = offline(root, """
            test -s /usr/local/share/man/man1/outpost.1
            man -l /usr/local/share/man/man1/outpost.1 2>/dev/null | grep -q 'EXIT STATUS' \
                || grep -q '^.SH "EXIT STATUS"' /usr/local/share/man/man1/outpost.1
            bash -c '. /usr/local/share/bash-completion/completions/outpost
                     COMP_WORDS=(outpost bu); COMP_CWORD=1; _outpost; echo "${COMPREPLY[*]}"; complete -p outpost'
            """)
        report.check(f"{arch}: the man page and the bash completion (generated at build time) are installed",
                     proc.returncode == 0 and "buffer" in proc.stdout and "complete -F _outpost outpost" in proc.stdout,
                     proc.stdout + proc.stderr)

        # 3. outpost check.
        proc = offline(root, f"cd {new}/deploy/examples && for f in *.toml; do outpost check \"$f\"; done")
        report.check(f"{arch}: `outpost check` accepts every example configuration", proc.returncode == 0,
                     proc.stdout + proc.stderr)
        proc = offline(root, "outpost check /srv/broken.toml")
        report.check(f"{arch}: `outpost check` refuses a broken file with exit 2 and its key path",
                     proc.returncode == 2 and "interval" in proc.stderr, f"exit {proc.returncode}: {proc.stderr}")

        if machine == "armv7l":
            proc = offline(root, "/opt/outpost/venv/bin/python /srv/pure_aiokafka.py")
            report.check(f"{arch}: the pure-Python aiokafka wheel is in use and round-trips a zstd batch",
                         proc.returncode == 0, proc.stdout + proc.stderr)

        # 4. The gateway for a while, with the root's Mosquitto on loopback.
        shutil.copy2(root / "srv" / "gateway.toml", root / "etc" / "outpost" / "outpost.toml")
        proc = offline(root, """
            # What systemd's RuntimeDirectory= and StateDirectory= would create.
            install -d -o outpost -g outpost -m 0750 /run/outpost /var/lib/outpost
            install -d -o mosquitto /run/mosquitto
            mosquitto -c /etc/mosquitto/mosquitto.conf > /var/log/mosquitto-run.log 2>&1 &
            sleep 2
            runuser -u outpost -- /opt/outpost/venv/bin/outpost run --config /etc/outpost/outpost.toml \
                > /var/log/outpost-run.log 2>&1 &
            gw=$!
            timeout 180 mosquitto_sub -h 127.0.0.1 -t 'spBv1.0/deploytest/DDATA/#' -C 5 -F '%t' > /tmp/ddata.txt &
            sub=$!
            for i in $(seq 1 60); do
                kill -0 $gw || { echo "the gateway exited"; break; }
                if outpost status --json > /tmp/status.json 2>/dev/null && python3 - <<'EOF'
            import json, sys
            s = json.load(open("/tmp/status.json"))
            sys.exit(0 if s["links"]["mqtt"]["up"] and s["buffer"]["cursors"]["mqtt"]["acked_seq"] >= 10 else 1)
            EOF
                then break; fi
                sleep 2
            done
            wait $sub || true
            outpost status || true
            kill -TERM $gw || true
            wait $gw || echo "gateway exit $?"
            echo "ddata messages: $(wc -l < /tmp/ddata.txt)"
            """, timeout=600)
        status = {}
        with contextlib.suppress(Exception):
            status = json.loads((root / "tmp" / "status.json").read_text())
        mqtt_acked = status.get("buffer", {}).get("cursors", {}).get("mqtt", {}).get("acked_seq", 0)
        kafka_waiting = status.get("buffer", {}).get("cursors", {}).get("kafka", {}).get("records", 0)
        log_tail = (root / "var" / "log" / "outpost-run.log").read_text()[-2000:] if (
            root / "var" / "log" / "outpost-run.log").exists() else ""
        report.check(f"{arch}: gateway delivers simulator samples to the local Mosquitto (`outpost status`)",
                     proc.returncode == 0 and status.get("links", {}).get("mqtt", {}).get("up") is True
                     and mqtt_acked >= 10 and "ddata messages: 5" in proc.stdout,
                     f"mqtt acked_seq={mqtt_acked}\n{proc.stdout[-2500:]}{proc.stderr[-1000:]}\n{log_tail}")
        report.check(f"{arch}: the Kafka link is down and its records wait in the buffer",
                     status.get("links", {}).get("kafka", {}).get("up") is False and kafka_waiting > 0,
                     f"kafka records waiting={kafka_waiting}")
        report.figure(f"{arch}_mqtt_acked_in_run", mqtt_acked)

        # 7. Sparkplug benchmark under emulation (figures only).
        proc = offline(root, f"cd /srv/bench && /opt/outpost/venv/bin/python -m tests.benchmarks.sparkplug "
                             f"--json --seconds {bench_s}")
        if report.check(f"{arch}: Sparkplug benchmark runs", proc.returncode == 0, proc.stdout + proc.stderr):
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for k in ("encode_payload_metrics_per_s", "decode_payload_metrics_per_s", "gateway_path_metrics_per_s"):
                report.figure(f"{arch}_{k}", result[k])
        proc = offline(root, "/opt/outpost/venv/bin/python -c 'from google.protobuf.internal "
                             "import api_implementation as a; print(a.Type())'")
        report.figure(f"{arch}_protobuf_implementation", proc.stdout.strip())

        # 5a. systemd-analyze verify inside the root.
        proc = offline(root, "systemd-analyze verify /etc/systemd/system/outpost.service")
        noise = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "outpost" in ln]
        report.check(f"{arch}: `systemd-analyze verify` of the installed unit in the root",
                     proc.returncode == 0 and not noise, proc.stdout + proc.stderr)

    # 5b. Boot the root and exercise the service for real.
    nspawn_probe(arch, root, report)

    with mounted(root):
        # 6. Upgrade, then uninstall.
        before = {p: hashlib.sha256((root / p).read_bytes()).hexdigest()
                  for p in ("etc/outpost/outpost.toml", "etc/outpost/outpost.env")}
        (root / "etc" / "outpost" / "outpost.env").write_text("OUTPOST_TEST_SECRET=kept\n")
        before["etc/outpost/outpost.env"] = hashlib.sha256(b"OUTPOST_TEST_SECRET=kept\n").hexdigest()
        buffer_rows = buffer_records(root)
        proc = offline(root, f"{upg}/deploy/install.sh --no-start && outpost --version")
        after = {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in before}
        report.check(f"{arch}: upgrade to {UPGRADE_VERSION} offline",
                     proc.returncode == 0 and UPGRADE_VERSION in proc.stdout, proc.stdout + proc.stderr)
        report.check(f"{arch}: the upgrade keeps configuration, secrets and buffer",
                     before == after and buffer_rows > 0 and buffer_records(root) == buffer_rows,
                     f"config/secrets same={before == after}, buffer records {buffer_rows} -> {buffer_records(root)}")
        proc = offline(root, f"{upg}/deploy/install.sh --uninstall")
        gone = not any((root / p).exists() or (root / p).is_symlink() for p in (
            "opt/outpost/venv", "usr/local/bin/outpost", "etc/systemd/system/outpost.service",
            "usr/local/share/man/man1/outpost.1", "usr/local/share/bash-completion/completions/outpost"))
        kept = all((root / p).exists() for p in ("etc/outpost/outpost.toml", "var/lib/outpost/buffer.db"))
        report.check(f"{arch}: uninstall removes the service and venv, keeps configuration and buffer",
                     proc.returncode == 0 and gone and kept and buffer_records(root) == buffer_rows,
                     f"gone={gone} kept={kept}\n{proc.stdout}{proc.stderr}")


def buffer_records(root: Path) -> int:
    """Records stored in the root's buffer, read with the host's sqlite3 module."""
    import sqlite3

    db = root / "var" / "lib" / "outpost" / "buffer.db"
    if not db.exists():
        return -1
    # As root, SQLite gives any -wal/-shm file it creates the database file's owner.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0]


# ----------------------------------------------------------------------------- systemd-nspawn --boot

PROBE = Path(__file__).with_name("probe.sh")

PROBE_UNIT = """\
[Unit]
Description=Outpost deploy test probe
After=multi-user.target mosquitto.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/outpost-deploy-probe
[Install]
WantedBy=multi-user.target
"""


def nspawn_probe(arch: str, root: Path, report: Report) -> None:
    probe = root / "usr" / "local" / "sbin" / "outpost-deploy-probe"
    shutil.copy2(PROBE, probe)
    probe.chmod(0o755)
    unit = root / "etc" / "systemd" / "system" / "outpost-deploy-probe.service"
    unit.write_text(PROBE_UNIT)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / unit.name
    wants.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        wants.unlink()
    wants.symlink_to(f"/etc/systemd/system/{unit.name}")
    for stale in ("probe.jsonl", "probe.done"):
        with contextlib.suppress(FileNotFoundError):
            (root / "root" / stale).unlink()
    # The Kafka uplink's records from the chroot run are in the buffer: keep them for the upgrade.
    start = time.monotonic()
    proc = sh(["systemd-nspawn", "--quiet", "--directory", str(root), "--boot", "--private-network",
               "--register=no", "--keep-unit", "--console=pipe"], check=False, timeout=900,
              stdin=subprocess.DEVNULL)
    wants.unlink()
    unit.unlink()
    booted = (root / "root" / "probe.done").exists()
    if not report.check(f"{arch}: systemd-nspawn --boot runs the root's systemd and the probe",
                        booted, f"nspawn exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"):
        return
    report.figure(f"{arch}_nspawn_probe_s", round(time.monotonic() - start))
    for line in (root / "root" / "probe.jsonl").read_text().splitlines():
        item = json.loads(line)
        report.check(f"{arch}: service: {item['name']}", item["ok"], item["detail"])
    journal = (root / "root" / "journal.txt").read_text(errors="replace")
    (WORK / f"journal-{arch}.txt").write_text(journal)
    config_error = (root / "root" / "journal-config-error.txt").read_text(errors="replace")
    report.check(f"{arch}: service: the journal says why a configuration error is not restarted",
                 "status=2" in config_error and "interval" in config_error
                 and "not restarting until it is fixed" in config_error, config_error[-1500:])


# ----------------------------------------------------------------------------- image script


def image_test(arch: str, root_tarball: Path, dist: Path, report: Report) -> None:
    from tests.deploy.image import run_image_test

    run_image_test(root_tarball, dist, WORK / "image", report, machine=ARCHES[arch][0])


# ----------------------------------------------------------------------------- main


def remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount left inside (a bind-mounted /dev would be the host's)."""
    if not path.exists():
        return
    for target in (path / "proc", path / "sys", path / "dev"):
        sh(["umount", "-R", "-l", str(target)], check=False)
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        left = [ln.split()[1] for ln in f if ln.split()[1].startswith(prefix)]
    if left:
        raise StepError(f"refusing to delete {path}: still mounted inside: {left}")
    shutil.rmtree(path)


def prepare_root(arch: str, tarball: Path) -> Path:
    root = WORK / f"root-{arch}"
    remove_tree(root)
    root.mkdir(parents=True)
    sh(f"zstd -q -d -c {tarball} | tar -C {root} --numeric-owner -xf -", timeout=600)
    return root


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"test-deploy: signal {signum}")  # unwinds through every `finally`: mounts go


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(ARCHES))
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--bench-seconds", type=float, default=2.0)
    ap.add_argument("--json", help="write the figures and results to this file")
    args = ap.parse_args(argv)
    arches = args.arch or ["arm64", "armhf"]
    report = Report()
    started = time.monotonic()
    if os.geteuid() != 0:
        report.check("running as root (debootstrap, chroot, loop devices)", False, "run with sudo")
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        try:
            run_all(arches, args, report)
        except (StepError, subprocess.TimeoutExpired) as exc:
            report.check("test-deploy step", False, str(exc))
    elapsed = time.monotonic() - started
    report.figure("test_deploy_total_s", round(elapsed))
    enc = [report.figures.get(f"{a}_encode_payload_metrics_per_s") for a in ("armhf", "arm64")]
    dec = [report.figures.get(f"{a}_decode_payload_metrics_per_s") for a in ("armhf", "arm64")]
    if all(enc) and all(dec):
        report.figure("armv7_over_arm64_encode_ratio", round(enc[0] / enc[1], 3))
        report.figure("armv7_over_arm64_decode_ratio", round(dec[0] / dec[1], 3))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"figures": report.figures, "results": [
            {"name": n, "ok": ok, "detail": d[-500:]} for n, ok, d in report.results]}, indent=2))
    passed = len(report.results) - report.failed
    print(f"{passed} passed, {report.failed} failed")
    return 0 if report.failed == 0 else 1


def run_all(arches: list[str], args: argparse.Namespace, report: Report) -> None:
    if not ensure_binfmt(report):
        return
    dists = build_dists(report, arches)
    if dists is None:
        return
    # debootstrap under emulation is mostly one busy core per root and network waits: make the
    # missing roots side by side (a cold run only), then exercise them one at a time.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(arches)) as pool:
        made = dict(zip(arches, pool.map(lambda a: cached_root(a, report), arches), strict=True))
    tarballs = {a: t for a, t in made.items() if t is not None}
    for arch in arches:
        tarball = tarballs.get(arch)
        if tarball is None:
            continue
        root = prepare_root(arch, tarball)
        install_and_exercise(arch, root, dists[0], dists[1], report, args.bench_seconds)
        remove_tree(root)
    # The image test on the 64-bit image most Pis run (armhf only when arm64 was not asked for).
    image_arch = "arm64" if "arm64" in tarballs else next(iter(tarballs), None)
    if not args.skip_image and image_arch:
        image_test(image_arch, tarballs[image_arch], dists[0], report)


if __name__ == "__main__":
    sys.exit(main())
