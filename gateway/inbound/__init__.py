"""What comes in: the local MQTT bridge and Kafka commands, into the buffer or checked writes."""
