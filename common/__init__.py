"""Mechanisms shared by drivers, buffer and gateway: one backoff, one log shape, log-once."""
