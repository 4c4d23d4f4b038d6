"""The test harness: real Kafka, Mosquitto, Toxiproxy and socat pty pairs for the test tiers.

tests/conftest.py turns these into fixtures; `python -m tests.harness up|down|env` runs the
same stack by hand. See tests/harness/README.md.
"""
