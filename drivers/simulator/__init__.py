"""Simulator driver: deterministic waveforms for demos and load tests."""
