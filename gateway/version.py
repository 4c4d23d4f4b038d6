"""The version of Outpost: this one line is the only place it is written (pyproject reads it).

`version_report()` is what `outpost --version` prints: Outpost's version and build, Python,
and the versions of the libraries a bug report needs. It must stay cheap (a Pi runs it at
every shell completion and in scripts): library versions come from the installed package
metadata, never from importing the libraries, and the build from a module that
`deploy/build_dist.py` writes into the wheel (`gateway/_build_info.py`: a module, because
tomllib alone costs a quarter of a bare Python start), or, in a source checkout, from the
files in `.git` (no subprocess).
"""

from __future__ import annotations

__version__ = "0.1.0"

# The distributions whose versions a bug report needs, in the order they are printed.
KEY_LIBRARIES = ("gmqtt", "aiokafka", "pymodbus", "pyserial", "pyserial-asyncio-fast", "protobuf", "pydantic")


def library_versions(names: tuple[str, ...] = KEY_LIBRARIES) -> dict[str, str | None]:
    """name -> installed version, None when the distribution is not installed.

    The version is in the name of each `NAME-VERSION.dist-info` directory (the wheel format
    writes it there), so one listing of each sys.path directory answers for every library;
    importing importlib.metadata alone would cost half a bare Python start. What is not
    found that way (an egg-info install) is asked of importlib.metadata.
    """
    import os
    import sys

    wanted = {_canonical(n): n for n in names}
    out: dict[str, str | None] = dict.fromkeys(names)
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if not item.endswith(".dist-info"):
                continue
            dist, _, version = item.removesuffix(".dist-info").partition("-")
            name = wanted.get(_canonical(dist))
            if name is not None and out[name] is None and version:
                out[name] = version
    missing = [n for n, v in out.items() if v is None]
    if missing:
        from importlib import metadata

        for name in missing:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return out


def _canonical(name: str) -> str:
    return name.replace("_", "-").replace(".", "-").lower()


def build_info() -> dict[str, str]:
    """What this copy was built from: {"commit", "built", "dirty", "source"}; empty when unknown."""
    try:
        from gateway import _build_info as written  # type: ignore[attr-defined]
    except ImportError:
        import os

        commit = _git_head(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return {"commit": commit, "source": "source checkout"} if commit else {}
    info = {"commit": getattr(written, "COMMIT", ""), "built": getattr(written, "BUILT", ""),
            "dirty": "true" if getattr(written, "DIRTY", False) else ""}
    return {k: v for k, v in info.items() if v}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _git_head(top: str) -> str | None:
    """The commit a source checkout's HEAD points at, read from the files in `.git` (a
    worktree's `.git` is a file naming its git dir; refs may be loose or packed)."""
    import os

    dot = os.path.join(top, ".git")
    try:
        if os.path.isfile(dot):
            text = _read(dot)
            if not text.startswith("gitdir:"):
                return None
            gitdir = os.path.join(top, text.removeprefix("gitdir:").strip())
        elif os.path.isdir(dot):
            gitdir = dot
        else:
            return None
        head = _read(os.path.join(gitdir, "HEAD"))
        if not head.startswith("ref:"):
            return head or None
        ref = head.removeprefix("ref:").strip()
        common = gitdir
        if os.path.isfile(os.path.join(gitdir, "commondir")):
            common = os.path.join(gitdir, _read(os.path.join(gitdir, "commondir")))
        for base in (gitdir, common):
            if os.path.isfile(os.path.join(base, ref)):
                return _read(os.path.join(base, ref)) or None
        packed = os.path.join(common, "packed-refs")
        if os.path.isfile(packed):
            for line in _read(packed).splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def version_report() -> str:
    """The text of `outpost --version`: first line `outpost VERSION`, then build, Python, libraries."""
    import sys

    info = build_info()
    commit = info.get("commit", "")
    build = commit[:12] if commit else "unknown"
    details = [x for x in (info.get("source"), f"built {info['built']}" if info.get("built") else None,
                           "with uncommitted changes" if info.get("dirty") == "true" else None) if x]
    if details:
        build += f" ({', '.join(details)})"
    lines = [
        f"outpost {__version__}",
        f"build: {build}",
        f"python: {'.'.join(map(str, sys.version_info[:3]))} ({sys.implementation.name}, {sys.executable})",
    ]
    for name, version in library_versions().items():
        lines.append(f"{name}: {version or 'not installed'}")
    return "\n".join(lines)
