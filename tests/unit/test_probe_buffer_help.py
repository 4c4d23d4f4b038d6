"""Every option of `outpost probe` and `outpost buffer` says what it does in --help."""

import argparse

import pytest

from gateway.cli import build_parser


def _missing(parser: argparse.ArgumentParser, path: list[str]) -> list[str]:
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out += _missing(sub, [*path, name])
        elif a.option_strings and a.dest != "help" and not a.help:
            out.append(f"{' '.join(path)} {'/'.join(a.option_strings)}")
    return out


@pytest.mark.parametrize("command", ["probe", "buffer"])
def test_every_option_has_help(command: str) -> None:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    assert _missing(sub.choices[command], ["outpost", command]) == []
