"""Mutation testing of the core modules: `python -m tests.mutation --json`.

Each core module is mutated (see `mutants.py`) and run against the tests meant to cover it
(see `runner.py`). Not part of `make test` (minutes per module); a smoke run of it is
(tests/unit/test_mutation_smoke.py).

TARGETS is the one table to edit when a module moves: module path -> test files (globs),
the sample size used by default for modules with thousands of mutants, and `only`: the
definitions to mutate (functions, classes, "Class.method") when the pure part of a module
is a few functions beside I/O code (the runner refuses a name that no longer exists).
"""

from __future__ import annotations

TARGETS: dict[str, dict] = {
    # The disk-full component test meets a real ENOSPC on a small tmpfs (needs root, ~5 s).
    # 400 of ~2,600 mutants: the score within about +-3 points (95 %), in ~15 minutes.
    "buffer/core.py": {"tests": ["tests/unit/test_buffer_*.py", "tests/component/test_buffer_disk_full.py"],
                       "sample": 400},
    "drivers/modbus/codec.py": {"tests": ["tests/unit/test_modbus_codec*.py"]},
    "drivers/modbus/planner.py": {"tests": ["tests/unit/test_modbus_planner*.py"]},
    "drivers/serial_line/codec.py": {"tests": ["tests/unit/test_serial_codec*.py"]},
    "gateway/uplinks/kafka/mappings.py": {"tests": ["tests/unit/test_mappings_*.py"]},
    "gateway/sparkplug/payload.py": {"tests": ["tests/unit/test_sparkplug_payload*.py"], "sample": 300},
    "gateway/sparkplug/edge.py": {"tests": ["tests/unit/test_sparkplug_edge*.py"]},
    "gateway/pipeline/report.py": {"tests": ["tests/unit/test_sparkplug_edge*.py"]},
    "gateway/uplinks/kafka/format.py": {
        "tests": ["tests/unit/test_kafka_format*.py", "tests/unit/test_clock_publish.py"]},
    # The uplinks' pure parts: batching, the uplink contract, the outcome classifications.
    "gateway/uplinks/kafka/accumulator.py": {"tests": ["tests/unit/test_kafka_accumulator.py"]},
    "gateway/uplinks/core.py": {"tests": ["tests/unit/test_uplink_state.py"]},
    "gateway/uplinks/mqtt/client.py": {"tests": ["tests/unit/test_uplink_state.py"],
                                       "only": ["reason_text", "puback_outcome"]},
    "gateway/uplinks/kafka/adapter.py": {
        "tests": ["tests/unit/test_uplink_state.py"],
        "only": ["murmur2_partition", "refuses_destination", "is_link_error", "is_too_large"]},
}
DEFAULT_SEED = 18
