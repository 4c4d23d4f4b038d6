"""Modbus RTU/TCP driver: config models, pure codec and read planner, the bus owner."""
