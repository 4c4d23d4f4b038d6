"""Sparkplug B 3.0.0 edge node: payload codec, topics, report-by-exception, births, session.

Pure modules (no I/O): payload, topics, edge. The session on MQTT lives in node.py and is
driven by gateway.uplinks.mqtt.sparkplug.
"""
