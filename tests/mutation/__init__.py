"""Mutation testing of the core modules: `python -m tests.mutation --json`.

Each core module is mutated (see `mutants.py`) and run against the tests meant to cover it
(see `runner.py`). Not part of `make test` (minutes per module); a smoke run of it is
(tests/unit/test_mutation_smoke.py).

TARGETS is the one table to edit when a module moves: module path -> test files (globs),
and the sample size used by default for modules with thousands of mutants.
"""

from __future__ import annotations

TARGETS: dict[str, dict] = {
    # The disk-full component test meets a real ENOSPC on a small tmpfs (needs root, ~2 s).
    "buffer/core.py": {"tests": ["tests/unit/test_buffer_*.py", "tests/component/test_buffer_disk_full.py"],
                       "sample": 120},
    "drivers/modbus/codec.py": {"tests": ["tests/unit/test_modbus_codec*.py"]},
    "drivers/modbus/planner.py": {"tests": ["tests/unit/test_modbus_planner*.py"]},
    "drivers/serial_line/codec.py": {"tests": ["tests/unit/test_serial_codec*.py"]},
    "gateway/uplinks/kafka/mappings.py": {"tests": ["tests/unit/test_mappings_*.py"]},
    "gateway/sparkplug/payload.py": {"tests": ["tests/unit/test_sparkplug_payload*.py"], "sample": 300},
    "gateway/sparkplug/edge.py": {"tests": ["tests/unit/test_sparkplug_edge*.py"]},
    "gateway/pipeline/report.py": {"tests": ["tests/unit/test_sparkplug_edge*.py"]},
    "gateway/uplinks/kafka/format.py": {
        "tests": ["tests/unit/test_kafka_format*.py", "tests/unit/test_clock_publish.py"]},
}
DEFAULT_SEED = 18
