"""The version of Outpost: this one line is the only place it is written (pyproject reads it)."""

__version__ = "0.1.0"
