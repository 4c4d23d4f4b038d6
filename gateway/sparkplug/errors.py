"""Errors of the Sparkplug edge node, under the gateway's one exception root."""

from __future__ import annotations

from gateway.errors import OutpostError


class SparkplugError(OutpostError):
    """Root of the Sparkplug layer's errors."""


class PayloadError(SparkplugError):
    """A Sparkplug B payload cannot be encoded or decoded (names the metric and datatype)."""


class TopicError(SparkplugError):
    """A string is not a Sparkplug B topic, or an id cannot be used in one."""


class CommandRejected(SparkplugError):
    """An NCMD/DCMD asked for something we will not do (unknown metric, read-only, out of range)."""
