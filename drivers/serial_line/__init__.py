"""Serial-line driver for ASCII sensors: config, pure framing/parsing codec, the port owner."""
