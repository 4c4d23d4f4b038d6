"""Kafka connection and batching settings (`[kafka]`), and the client arguments they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Connection and batching settings; field names follow the `[kafka]` config section."""

    bootstrap_servers: tuple[str, ...]
    client_id: str = "outpost"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    compression: str = "zstd"  # zstd | lz4 | gzip | none
    linger_s: float = 0.1
    batch_max_bytes: int = 1_000_000
    batch_max_records: int = 2000  # see README (Kafka uplink): the drain's figure
    request_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    metadata_max_age_s: float = 60.0
    max_bytes_per_s: float | None = None  # pace the backlog drain; None = as fast as acked

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("kafka: bootstrap_servers is empty")
        if self.compression not in ("zstd", "lz4", "gzip", "none"):
            raise ValueError(f"kafka: compression {self.compression!r} is not zstd|lz4|gzip|none")
        if self.batch_max_records < 1 or self.batch_max_bytes < 1024:
            raise ValueError("kafka: batch_max_records >= 1 and batch_max_bytes >= 1024 required")

    @classmethod
    def from_config(
        cls, section: Any, *, sasl_password: str | None = None, **overrides: Any
    ) -> KafkaSettings:
        """From the lead's `KafkaSection` (gateway.config); the password comes resolved."""
        values = {
            "bootstrap_servers": tuple(section.bootstrap_servers),
            "client_id": section.client_id or "outpost",
            "security_protocol": section.security_protocol,
            "sasl_mechanism": section.sasl_mechanism,
            "sasl_username": section.sasl_username,
            "sasl_password": sasl_password if sasl_password is not None else None,
            "ca_file": section.ca_file,
            "cert_file": section.cert_file,
            "key_file": section.key_file,
            "compression": section.compression,
            "linger_s": section.linger,
            "batch_max_bytes": section.batch_max_bytes,
            "batch_max_records": section.batch_max_records,
            "request_timeout_s": section.request_timeout,
            "reconnect_min_s": section.reconnect_min,
            "reconnect_max_s": section.reconnect_max,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def where(self) -> str:
        return ",".join(self.bootstrap_servers)
