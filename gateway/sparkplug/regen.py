"""Regenerate sparkplug_b_pb2.py from sparkplug_b.proto with protobuf's own compiler.

The generated module is committed so that the gateway needs no compiler at run time. It is
made by the protoc bundled in grpcio-tools, pinned below so that regenerating is
reproducible; the module it writes checks at import that the protobuf runtime is at least
as new as the compiler, so a pin bump here may need a protobuf bump in pyproject.toml.

Run: python -m gateway.sparkplug.regen        (writes the module)
     python -m gateway.sparkplug.regen --check (exits 1 if the committed module is stale)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import metadata
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.85.1"   # bundles libprotoc 35.1
HERE = Path(__file__).resolve().parent
PROTO = HERE / "sparkplug_b.proto"
MODULE = HERE / "sparkplug_b_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on the .proto into out_dir and return the generated file."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    rc = protoc.main(
        ["protoc", f"--proto_path={HERE}", f"--python_out={out_dir}", str(PROTO)]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed on {PROTO} with exit code {rc}")
    return out_dir / "sparkplug_b_pb2.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    installed = metadata.version("grpcio-tools")
    if installed != PINNED_GRPCIO_TOOLS:
        print(
            f"grpcio-tools {installed} is installed but the module is pinned to "
            f"{PINNED_GRPCIO_TOOLS}: install that version to regenerate",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp)).read_bytes()
    if args.check:
        if not MODULE.exists() or MODULE.read_bytes() != fresh:
            print(f"{MODULE} is stale: run python -m gateway.sparkplug.regen", file=sys.stderr)
            return 1
        return 0
    MODULE.write_bytes(fresh)
    print(f"wrote {MODULE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
