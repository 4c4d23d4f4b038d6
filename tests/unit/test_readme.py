"""The README is the front door: its configuration reference must match the models."""

from pathlib import Path

from gateway.config_doc import render

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render() in readme, (
        "README.md's configuration reference is out of date: "
        "run `.venv/bin/python -m gateway.config_doc --write README.md`"
    )


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`make demo`" in readme and "`make test`" in readme
