"""Release build: one installable tarball per architecture, installable with no network.

    python deploy/build_dist.py [--arch aarch64 --arch armv7l --arch x86_64] [--out dist]
                                [--version 0.1.1]

Each `dist/outpost-VERSION-ARCH.tar.gz` holds `outpost-VERSION-ARCH/`:

    deploy/install.sh               the installer (run it as root, see --help)
    deploy/systemd/outpost.service  the unit
    deploy/examples/*.toml          example configurations
    deploy/templates/*.toml         device templates for `outpost probe modbus --emit-toml`
    wheelhouse/*.whl                every pinned dependency for ARCH and CPython 3.11, plus Outpost
    wheelhouse/requirements.txt     name==version --hash=sha256:... of exactly those files
    wheelhouse/outpost.sha256       the hash of the Outpost wheel
    README.md, LICENSE, BUILD-INFO  what was built from what

Dependencies come from deploy/requirements.lock (pip-compile --generate-hashes): pip
downloads each file for the target platform with --require-hashes, so a file PyPI served
differently from the day the lock was made is refused. aiokafka publishes no armv7l wheel
and its sdist needs Cython and a C compiler: for armv7l the sdist (hash-checked against
the lock) is built here as a pure-Python wheel, which aiokafka supports at run time (its C
records are optional imports; see `aiokafka.util.NO_EXTENSIONS`). Its hash is written into
that wheelhouse's requirements.txt and BUILD-INFO.

Needs a build venv with setuptools >= 77 (`make dist` creates ~/.cache/outpost/build-venv).
Downloads are cached under ~/.cache/outpost/wheels, so a second build needs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "deploy" / "requirements.lock"
CACHE = Path(os.environ.get("OUTPOST_CACHE", Path.home() / ".cache" / "outpost")) / "wheels"
ARCHES = ("aarch64", "armv7l", "x86_64")
PYTHON_VERSION = "3.11"  # Debian Bookworm and Raspberry Pi OS Bookworm
# Bookworm has glibc 2.36: every manylinux tag up to 2_36 runs there.
GLIBC_MINORS = range(17, 37)
# Packages with no wheel for an architecture on PyPI, built here as pure-Python wheels.
PURE_BUILDS = {"armv7l": ("aiokafka",)}
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")


def source_parts() -> tuple[str, ...]:
    """The files a wheel build needs and the top-level packages pyproject.toml ships."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = sorted({pattern.rstrip("*").split(".")[0] for pattern in find["include"]})
    return (*SOURCE_FILES, *packages)


class DistError(Exception):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], **kw) -> None:
    env = dict(os.environ, PIP_FIND_LINKS="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise DistError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def lock_blocks(text: str) -> dict[str, str]:
    """name -> the lock's block for it: the `name==version \\` line and its --hash lines."""
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name = canonical(line.split("==")[0])
            blocks[name] = line + "\n"
        elif name and line.strip().startswith("--hash"):
            blocks[name] += line + "\n"
        elif not line.startswith(" "):
            name = None
    return blocks


def block_hashes(block: str) -> set[str]:
    return set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))


def cached(dest: Path, name: str, version: str, block: str, suffix: str) -> list[Path]:
    """Files in the cache for name==version whose hash the lock lists."""
    hashes = block_hashes(block)
    return [p for p in dest.glob(f"*{suffix}")
            if canonical(p.name.split("-")[0]) == name and f"-{version}" in p.name and sha256(p) in hashes]


def lock_pins(text: str) -> dict[str, str]:
    return {canonical(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_args(arch: str) -> list[str]:
    args: list[str] = []
    for minor in GLIBC_MINORS:
        args += ["--platform", f"manylinux_2_{minor}_{arch}"]
    args += ["--platform", f"manylinux2014_{arch}"]
    return [*args, "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp311",
            "--only-binary=:all:"]


def build_outpost_wheel(python: str, work: Path, version: str | None) -> Path:
    src = work / "outpost-src"
    for part in source_parts():
        p = ROOT / part
        if p.is_dir():
            shutil.copytree(p, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / part)
    if version:
        # The version is written once, in gateway/version.py (pyproject reads it), or in pyproject.
        for path, pattern in ((src / "gateway" / "version.py", r'(?m)^__version__ = "[^"]*"'),
                              (src / "pyproject.toml", r'(?m)^version = "[^"]*"')):
            if path.exists():
                text, n = re.subn(pattern, pattern.split(" = ")[0].removeprefix("(?m)^") + f' = "{version}"',
                                  path.read_text(), count=1)
                if n == 1:
                    path.write_text(text)
                    break
        else:
            raise DistError("no version in gateway/version.py or pyproject.toml")
    out = work / "outpost-wheel"
    run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), str(src)])
    (wheel,) = out.glob("outpost-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = [p for p in source_parts() if (ROOT / p / "__init__.py").exists() and f"{p}/__init__.py" not in names]
    if missing:
        raise DistError(f"{wheel.name} lacks the package(s) {missing}: check [tool.setuptools.packages.find]")
    return wheel


def download(python: str, arch: str, blocks: dict[str, str], work: Path) -> list[Path]:
    """Wheels of every locked package for `arch`, hash-checked; cached per architecture."""
    dest = CACHE / arch
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {n: b for n, b in blocks.items() if n not in PURE_BUILDS.get(arch, ())}
    pins = lock_pins("".join(wanted.values()))
    missing = {n: b for n, b in wanted.items() if not cached(dest, n, pins[n], b, ".whl")}
    if missing:
        req = work / f"req-{arch}.txt"
        req.write_text("".join(missing.values()))
        run([python, "-m", "pip", "download", "--no-deps", "--require-hashes", "-r", str(req),
             "-d", str(dest), *platform_args(arch)])
    files = []
    for name, version in pins.items():
        matches = cached(dest, name, version, blocks[name], ".whl")
        if not matches:
            raise DistError(f"{arch}: pip downloaded no wheel for {name}=={version}")
        # Several tags can match (a newer download beside an older one): pick the one pip would.
        files.append(sorted(matches, key=lambda p: p.stat().st_mtime)[-1])
    return files


def build_pure(python: str, name: str, version: str, block: str, work: Path) -> tuple[Path, Path]:
    """A pure-Python wheel of `name` from its sdist, for an architecture PyPI has no wheel for."""
    sdists = CACHE / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    if not cached(sdists, name, version, block, ".tar.gz"):
        req = work / f"req-sdist-{name}.txt"
        req.write_text(block)
        # pip prepares the sdist's metadata in an isolated build env (setuptools, Cython): only
        # on the first build, online; the hash-checked sdist is cached after that.
        run([python, "-m", "pip", "download", "--no-deps", "--require-hashes", "--no-binary=:all:",
             "-r", str(req), "-d", str(sdists)])
    (sdist,) = cached(sdists, name, version, block, ".tar.gz")
    tree = work / f"sdist-{name}"
    with tarfile.open(sdist) as tar:
        tar.extractall(tree, filter="data")
    (top,) = tree.iterdir()
    if name == "aiokafka":
        # Its setup.py cythonizes the C record codecs unconditionally and has no switch to
        # skip them: declare the same package with no extension modules. The pure-Python
        # record classes are what aiokafka imports when `_crecords` is missing.
        (top / "setup.py").write_text("from setuptools import setup\n\nsetup()\n")
        pyproject = top / "pyproject.toml"
        text = pyproject.read_text()
        text = re.sub(r'requires = \[[^\]]*\]', 'requires = ["setuptools >=77"]', text, count=1)
        pyproject.write_text(text)
    else:
        raise DistError(f"no pure-Python recipe for {name}")
    out = work / f"pure-{name}"
    run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), str(top)])
    (wheel,) = out.glob("*.whl")
    if not wheel.name.endswith("-py3-none-any.whl"):
        raise DistError(f"{wheel.name} is not a pure-Python wheel")
    with zipfile.ZipFile(wheel) as z:
        native = [n for n in z.namelist() if n.endswith((".so", ".pyx", ".c"))]
    if native:
        raise DistError(f"{wheel.name} carries native or Cython files: {native[:5]}")
    return wheel, sdist


def assemble(arch: str, version: str, wheels: list[Path], outpost: Path, info: list[str], out: Path) -> Path:
    name = f"outpost-{version}-{arch}"
    stage = out / name
    if stage.exists():
        shutil.rmtree(stage)
    wh = stage / "wheelhouse"
    wh.mkdir(parents=True)
    lines = []
    for w in sorted(wheels, key=lambda p: p.name):
        shutil.copy2(w, wh / w.name)
        pin = lock_pins_from_wheel(w)
        lines.append(f"{pin} \\\n    --hash=sha256:{sha256(w)}\n")
    (wh / "requirements.txt").write_text(
        f"# Outpost {version} for {arch}: every dependency, pinned, with the hash of the file in this folder.\n"
        + "".join(lines)
    )
    shutil.copy2(outpost, wh / outpost.name)
    (wh / "outpost.sha256").write_text(f"{sha256(outpost)}  {outpost.name}\n")
    (stage / "deploy" / "systemd").mkdir(parents=True)
    (stage / "deploy" / "examples").mkdir(parents=True)
    shutil.copy2(ROOT / "deploy" / "install.sh", stage / "deploy" / "install.sh")
    shutil.copy2(ROOT / "deploy" / "systemd" / "outpost.service", stage / "deploy" / "systemd")
    for example in (ROOT / "deploy" / "examples").glob("*.toml"):
        shutil.copy2(example, stage / "deploy" / "examples")
    (stage / "deploy" / "templates").mkdir(parents=True)
    for template in (ROOT / "deploy" / "templates").glob("*.toml"):
        shutil.copy2(template, stage / "deploy" / "templates")
    shutil.copy2(ROOT / "README.md", stage)
    shutil.copy2(ROOT / "LICENSE", stage)
    (stage / "BUILD-INFO").write_text("\n".join(info) + "\n")
    tarball = out / f"{name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(stage, arcname=name, filter=_root_owned)
    shutil.rmtree(stage)
    return tarball


def _root_owned(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def lock_pins_from_wheel(w: Path) -> str:
    parts = w.name.split("-")
    return f"{canonical(parts[0])}=={parts[1]}"


def source_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if "version" in project:
        return project["version"]
    match = re.search(r'(?m)^__version__ = "([^"]+)"', (ROOT / "gateway" / "version.py").read_text())
    if not match:
        raise DistError("no __version__ in gateway/version.py")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=ARCHES)
    ap.add_argument("--out", default=str(ROOT / "dist"))
    ap.add_argument("--version", help="override the version (for upgrade tests)")
    ap.add_argument("--python", default=sys.executable, help="build interpreter (setuptools >= 77)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock_text = LOCK.read_text()
    blocks = lock_blocks(lock_text)
    pins = lock_pins(lock_text)
    try:
        version = args.version or source_version()
        with tempfile.TemporaryDirectory(prefix="outpost-dist-") as tmp:
            work = Path(tmp)
            outpost = build_outpost_wheel(args.python, work, args.version)
            for arch in args.arch or ARCHES:
                wheels = download(args.python, arch, blocks, work)
                info = [f"outpost {version} for {arch}, CPython {PYTHON_VERSION}",
                        f"lock: deploy/requirements.lock sha256 {sha256(LOCK)}"]
                for name in PURE_BUILDS.get(arch, ()):
                    wheel, sdist = build_pure(args.python, name, pins[name], blocks[name], work)
                    wheels.append(wheel)
                    info.append(f"{wheel.name}: built here without C extensions from {sdist.name} "
                                f"(sha256 {sha256(sdist)}, checked against the lock)")
                tarball = assemble(arch, version, wheels, outpost, info, out)
                print(f"{tarball} ({tarball.stat().st_size // 1024} KiB, {len(wheels) + 1} wheels)")
    except DistError as exc:
        print(f"build_dist: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
