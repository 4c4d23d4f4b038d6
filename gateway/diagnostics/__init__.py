"""Field diagnostics: the local status socket, `outpost status/tail/doctor`, Prometheus metrics.

Everything here is local to the appliance (a Unix socket limited to the `outpost` group, a
loopback HTTP port) and takes plain callables and dicts, so it does not depend on how the
supervisor is built. The status document schema is in README.md next to this file.
"""
