"""Property-based fuzzing of what Outpost takes in: configuration files and write commands.

`python -m tests.fuzz --json [--budget-s N]` runs both for a time budget and prints the
cases tried and the failures found; tests/unit/test_config_fuzz.py and
tests/unit/test_writes_fuzz.py run a short budget of each inside the test command.
"""
