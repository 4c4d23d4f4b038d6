"""The running gateway: the supervisor that owns every task, task ownership, systemd."""
