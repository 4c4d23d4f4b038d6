"""MQTT: one client layer (`client`) under the Sparkplug B edge node session (`sparkplug`)."""
