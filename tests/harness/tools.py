"""Command-line tools the tests drive: kcat, and the Node peers in tests/peers (npm ci, once)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .common import REPO_ROOT, HarnessError, cache_lock, require_binary, run_checked

PEERS_DIR = REPO_ROOT / "tests" / "peers"
_MARKER = ".outpost-lock-sha256"


def kcat_path() -> str:
    return require_binary("kcat", "install the Debian package `kcat` (apt-get install -y kcat)")


def ensure_node_peers(peers_dir: Path = PEERS_DIR) -> Path:
    """tests/peers with node_modules matching package-lock.json (npm ci when it does not)."""
    lock = peers_dir / "package-lock.json"
    if not lock.exists():
        raise HarnessError(f"{lock} is missing; run `npm install` in {peers_dir} and commit it")
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    marker = peers_dir / "node_modules" / _MARKER
    if marker.exists() and marker.read_text().strip() == digest:
        return peers_dir
    with cache_lock("npm-peers"):
        if marker.exists() and marker.read_text().strip() == digest:
            return peers_dir
        npm = shutil.which("npm")
        if npm is None:
            raise HarnessError("`npm` is not on PATH; install Node.js 20 with npm")
        run_checked([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                    f"installing the Node test peers in {peers_dir}", cwd=peers_dir,
                    timeout_s=600)
        marker.write_text(digest + "\n")
    return peers_dir
