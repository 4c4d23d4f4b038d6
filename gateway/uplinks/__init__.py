"""Uplinks: forward buffered records to MQTT and Kafka, each through its own buffer cursor."""
