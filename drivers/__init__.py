"""Outpost device drivers: one folder per protocol; the shared contract is drivers/base.py."""
