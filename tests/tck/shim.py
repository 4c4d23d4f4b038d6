"""Runs `outpost` with `data_qos` set in the [mqtt] table of the config the TCK driver wrote.

The shared TCK driver writes its own outpost.toml (it knows nothing of data_qos); this shim
stands in as its `--outpost` executable: for `check`/`run --config PATH` it sets
`data_qos = N` in PATH (so the run directory keeps the config that was really used), then
execs the real outpost with the same arguments. Standard library only; no project imports.

    shim.py --data-qos N -- /path/to/outpost run --config /run/dir/outpost.toml
"""

from __future__ import annotations

import os
import re
import sys


def set_data_qos(text: str, qos: int) -> str:
    lines = text.splitlines()
    out, in_mqtt, done = [], False, False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            in_mqtt = stripped == "[mqtt]"
            out.append(line)
            if in_mqtt and not done:
                out.append(f"data_qos = {qos}")
                done = True
            continue
        if in_mqtt and re.match(r"data_qos\s*=", stripped):
            continue  # replaced by the line above
        out.append(line)
    if not done:
        raise SystemExit("shim: the config has no [mqtt] table")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] != "--data-qos" or argv[2] != "--":
        raise SystemExit("usage: shim.py --data-qos N -- OUTPOST ARGS...")
    qos = int(argv[1])
    outpost, args = argv[3], argv[4:]
    if "--config" in args:
        path = args[args.index("--config") + 1]
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(set_data_qos(text, qos))
    os.execv(outpost, [outpost, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
