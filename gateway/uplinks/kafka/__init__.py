"""Kafka: mappings, formats, a pure batching accumulator, the aiokafka adapter and the pump."""
