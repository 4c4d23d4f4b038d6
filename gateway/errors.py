"""One exception root for the gateway package; `retriable` drives retry decisions."""


class OutpostError(Exception):
    retriable: bool = False


class ConfigError(OutpostError):
    """The configuration file is missing or invalid. `problems` lists every problem found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the configuration\n{lines}")


class UplinkError(OutpostError):
    retriable = True
