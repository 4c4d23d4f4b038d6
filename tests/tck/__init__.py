"""The official Eclipse Sparkplug 3.0 TCK (edge profile) run against `outpost run`.

The TCK itself (the HiveMQ extension, its launcher and the reference driver that follows the
web console's choreography for the seven edge tests) is not part of this repository: it lives
in the team's shared folder, `../shared/tck` beside the clone (CI gets a copy there), or where
`OUTPOST_SPARKPLUG_TCK` points. Its README describes the control protocol and the choreography.

This package adds what the project needs on top of it:
- `tck_dir()` and `audit_assertions()`: where the TCK is and the list of every tck-id of the
  specification (from the TCK's coverage report), for the conformance document's test;
- `prepare()`: Maven fetch of HiveMQ CE into ~/.cache/sparkplug-tck (make tools does it once);
- `run_mode()`: one full run of the seven edge tests with a given `mqtt.data_qos`.

`python -m tests.tck --json` runs both modes and prints the figures (see __main__.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "shim.py"
EDGE_TESTS = ["SessionEstablishmentTest", "SessionTerminationTest", "SendDataTest", "SendComplexDataTest",
              "ReceiveCommandTest", "PrimaryHostTest", "MultipleBrokerTest"]
# The deliberate deviation of the default data_qos = 1 (docs/sparkplug-conformance.md).
QOS1_DEVIATION = frozenset({"payloads-ddata-qos", "topics-ddata-mqtt"})


class TckMissing(RuntimeError):
    pass


def tck_dir() -> Path:
    """The shared TCK folder: $OUTPOST_SPARKPLUG_TCK, else ../shared/tck beside the repository."""
    env = os.environ.get("OUTPOST_SPARKPLUG_TCK")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "tck")
    for c in candidates:
        if (c / "run_edge_tests.py").is_file() and (c / "run_broker.sh").is_file():
            return c.resolve()
    raise TckMissing(f"the Sparkplug TCK is not in any of {[str(c) for c in candidates]}: put the shared "
                     "tck folder beside the clone (../shared/tck) or set OUTPOST_SPARKPLUG_TCK")


def audit_file() -> Path:
    return tck_dir() / "extensions" / "sparkplug-tck" / "coverage" / "tck-audit-audit.xml"


def audit_assertions() -> dict[str, tuple[str, str]]:
    """Every tck-id of the Sparkplug 3.0 specification: {id: (section id, statement text)}.

    Read from the TCK's coverage report, which is generated from the specification's asciidoc
    (`[tck-testable tck-id-...]` blocks); ids are given without the `tck-id-` prefix.
    """
    root = ET.parse(audit_file()).getroot()
    out: dict[str, tuple[str, str]] = {}
    for section in root.iter():
        if not section.tag.endswith("section"):
            continue
        for a in section:
            if a.tag.endswith("assertion"):
                text = " ".join("".join(a.itertext()).split())
                if text.startswith("[tck-id-"):
                    text = text.split("] ", 1)[-1]
                out[a.get("id", "")] = (section.get("id", ""), text)
    return out


def prepare() -> str:
    """Resolve HiveMQ CE with Maven and compile the launcher, once (cached under ~/.cache)."""
    r = subprocess.run(["bash", str(tck_dir() / "run_broker.sh"), "--prepare"], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"run_broker.sh --prepare failed:\n{r.stdout}{r.stderr}")
    return r.stdout.strip()


def _port_pair() -> int:
    """A port P with P and P+1 free (the TCK broker and MultipleBrokerTest's second broker)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class ModeResult:
    data_qos: int | None          # None: the default (not set in the config)
    returncode: int
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def failed_ids(self) -> set[str]:
        return set(self.summary.get("failed_tck_ids", []))

    @property
    def run_dir(self) -> Path | None:
        d = self.summary.get("run_dir")
        return Path(d) if d else None

    def tests(self) -> dict[str, dict[str, Any]]:
        return {t["test"]: t for t in self.summary.get("tests", [])}

    def assertions(self) -> list[dict[str, Any]]:
        """Every assertion of every test (results.json of the run directory)."""
        if self.run_dir is None or not (self.run_dir / "results.json").is_file():
            return []
        out = []
        for t in json.loads((self.run_dir / "results.json").read_text()):
            for a in t.get("assertions", []):
                out.append(dict(a, test=t["test"]))
        return out

    def table(self) -> str:
        lines = [f"data_qos={'1 (default)' if self.data_qos is None else self.data_qos}: "
                 f"{self.seconds:.0f}s, rc={self.returncode}"]
        for t in self.summary.get("tests", []):
            failed = ", ".join(f["tck_id"] for f in t["failed"]) or "-"
            lines.append(f"  {t['test']:28} {t['overall']:28} pass {t['pass']:3} fail {t['fail']:2} "
                         f"n/e {t['not_executed']:2}  failed: {failed}")
        if not self.summary:
            lines.append("  no JSON summary; driver stderr:\n" + self.stderr_tail)
        return "\n".join(lines)


def _shim(workdir: Path, outpost: Path, data_qos: int | None) -> Path:
    """An executable that runs `outpost` after setting [mqtt] data_qos in the driver's config."""
    if data_qos is None:
        return outpost
    path = workdir / f"outpost-data-qos-{data_qos}"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {SHIM} --data-qos {data_qos} -- {outpost} \"$@\"\n")
    path.chmod(0o755)
    return path


def run_mode(data_qos: int | None, workdir: Path, *, outpost: Path | None = None,
             tests: list[str] | None = None, protocol: str = "5") -> ModeResult:
    """One run of the edge tests through the shared driver, on its own broker and ports."""
    outpost = outpost or REPO / ".venv" / "bin" / "outpost"
    workdir.mkdir(parents=True, exist_ok=True)
    exe = _shim(workdir, outpost, data_qos)
    argv = [sys.executable, str(tck_dir() / "run_edge_tests.py"), "--json", "--outpost", str(exe),
            "--python", str(outpost.parent / "python"), "--project", str(REPO),
            "--port", str(_port_pair()), "--protocol", protocol, "--workdir", str(workdir),
            "--tests", ",".join(tests or EDGE_TESTS)]
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        r = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, check=False)
        err.seek(0)
        stderr = err.read()
    seconds = time.monotonic() - t0
    (workdir / "driver-stderr.txt").write_text(stderr)
    summary: dict[str, Any] = {}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if lines:
        summary = json.loads(lines[-1])
    return ModeResult(data_qos, r.returncode, seconds, summary, "\n".join(stderr.splitlines()[-40:]))


def verdict(res: ModeResult, tests: list[str]) -> list[str]:
    """What is wrong with a mode's result, as sentences; empty when it is as expected."""
    problems = []
    ran = res.tests()
    for t in tests:
        if t not in ran or ran[t]["overall"] == "NO RESULT":
            problems.append(f"{t}: no result")
        elif ran[t]["verdict"] != "PASS" and not ran[t]["failed"]:
            problems.append(f"{t}: {ran[t]['overall']} without a failed assertion")
    allowed = set() if res.data_qos == 0 else set(QOS1_DEVIATION)
    unexpected = res.failed_ids - allowed
    if unexpected:
        problems.append(f"unexpected failed assertions: {sorted(unexpected)}")
    if res.data_qos != 0 and "SendDataTest" in tests and not QOS1_DEVIATION <= res.failed_ids:
        problems.append(f"data_qos = 1 should fail exactly {sorted(QOS1_DEVIATION)} in SendDataTest, "
                        f"failed: {sorted(res.failed_ids)}")
    return problems
