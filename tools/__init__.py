"""Programs for Outpost's users that are not part of the gateway (see each module's docstring)."""
