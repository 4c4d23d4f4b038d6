"""The CLI's conventions (issue 15) and its start-up import set (issue 16).

- every option and positional of every subcommand, whoever wrote it, has help text;
- `outpost --help` lists the exit codes and environment variables;
- the man page and the bash completion generated from the parser are valid (groff, bash -n)
  and offer what the parser has;
- `outpost --version` reports build, Python and library versions without importing them;
- `status`, `tail` and `--version` import no configuration models or client libraries (the
  behaviour behind the start-up time; the time itself is in tests/benchmarks/cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import cli
from gateway.cli import docgen
from gateway.version import KEY_LIBRARIES, build_info, library_versions

ROOT = Path(__file__).resolve().parents[2]
# What status/tail/--version must not import: the configuration models and the libraries of
# the gateway's links and drivers (each costs a bare Python start or more on a Pi).
HEAVY = ("pydantic", "pydantic_core", "gmqtt", "aiokafka", "pymodbus", "google.protobuf", "serial", "prometheus_client")


def _outpost(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


# --- help text ---------------------------------------------------------------------------


def _undocumented(parser: argparse.ArgumentParser, path: str = "outpost") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not (helps.get(name) or "").strip():
                    missing.append(f"{path} {name} (the command itself)")
                missing += _undocumented(sub, f"{path} {name}")
            continue
        if action.help == argparse.SUPPRESS:
            continue
        if not (action.help or "").strip():
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_subcommand_has_help_text() -> None:
    missing = _undocumented(cli.build_parser())
    assert not missing, "options without help text:\n  " + "\n  ".join(missing)


def test_the_help_walk_finds_an_option_without_help() -> None:
    # The check above must be able to fail: a parser with one undocumented option.
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("status", help="documented")
    s.add_argument("--json", action="store_true")
    assert _undocumented(p) == ["outpost status --json"]


def test_the_parser_main_builds_for_one_command_parses_as_the_whole_one() -> None:
    """`main` builds only the subcommand a command line names (for the core commands and
    --version): each must have the same options there as in the whole parser."""
    full = {" ".join(c.path): c for c in docgen.commands(docgen.walk(cli.build_parser()))}
    for name in cli.CORE_COMMANDS:
        one = docgen.walk(cli.build_parser(only=name))
        assert [c.path for c in one.subcommands] == [[name]]
        assert [o.invocation for o in one.subcommands[0].options] == [o.invocation for o in full[name].options]
        assert [o.help for o in one.subcommands[0].options] == [o.help for o in full[name].options]
    assert cli._only(["status", "--json"]) == "status" and cli._only(["--version"]) == "--version"
    assert cli._only(["probe", "modbus"]) is None and cli._only(["--help"]) is None and cli._only([]) is None


def test_help_lists_exit_codes_and_environment() -> None:
    res = _outpost("--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    assert "exit codes:" in text and "environment:" in text
    for code, _ in cli.EXIT_CODES:
        assert f" {code} " in text
    for var in ("OUTPOST_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM"):
        assert var in text


def test_every_environment_variable_read_is_documented() -> None:
    """grep the code for os.environ reads: each variable named there is in ENVIRONMENT. Not
    `outpost`'s: the demo (`make demo`, reads the test services' addresses) and the docs
    generator (build time, SOURCE_DATE_EPOCH)."""
    not_outpost = {ROOT / "gateway" / "cli" / "demo.py", ROOT / "gateway" / "cli" / "docgen.py"}

    documented = " ".join(name for name, _ in cli.ENVIRONMENT)
    read: set[str] = set()
    for top in ("gateway", "drivers", "buffer", "common"):
        for path in set((ROOT / top).rglob("*.py")) - not_outpost:
            text = path.read_text()
            read |= set(re.findall(r"""(?:environ|env)(?:\.get)?[\[(]\s*["']([A-Z][A-Z0-9_]+)["']""", text))
            read |= set(re.findall(r"""["']([A-Z][A-Z0-9_]+)["']\s+in\s+os\.environ""", text))
            if "environ" in text:  # a name kept in a constant: Outpost's own are OUTPOST_*
                read |= set(re.findall(r"""["'](OUTPOST_[A-Z0-9_]+)["']""", text))
    assert "OUTPOST_CONFIG" in read and "WATCHDOG_USEC" in read  # the grep itself works
    assert not {v for v in read if v not in documented}, f"read but not in cli.ENVIRONMENT: {read}"


def test_exit_codes_documented_are_the_ones_returned() -> None:
    from gateway.cli.probe import EXIT_INTERRUPTED

    assert [c for c, _ in cli.EXIT_CODES] == [cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_CONFIG, EXIT_INTERRUPTED]
    assert _outpost("no-such-command").returncode == cli.EXIT_CONFIG  # argparse usage error
    assert _outpost("status", "--socket", "/nonexistent/outpost.sock").returncode == cli.EXIT_FAILURE


def test_cli_defaults_agree_with_the_configuration_models() -> None:
    from gateway.config import DEFAULT_CONFIG_PATH, DiagnosticsSection

    assert cli.DEFAULT_CONFIG_PATH == DEFAULT_CONFIG_PATH
    assert cli.DEFAULT_SOCKET_PATH == DiagnosticsSection.model_fields["socket_path"].default


# --- socket path without the models ------------------------------------------------------


def test_socket_path_read_from_the_file_and_its_dropins(tmp_path: Path) -> None:
    from gateway.config import load_config

    main = tmp_path / "outpost.toml"
    main.write_text('[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n')
    assert cli.socket_path_from_config(str(main)) == cli.DEFAULT_SOCKET_PATH
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-diag.toml").write_text(f'[diagnostics]\nsocket_path = "{tmp_path}/s.sock"\n')
    assert cli.socket_path_from_config(str(main)) == f"{tmp_path}/s.sock"
    assert load_config(main).diagnostics.socket_path == f"{tmp_path}/s.sock"  # what the gateway uses
    # Set twice: the configuration is invalid, as before the default is asked.
    main.write_text(main.read_text() + '[diagnostics]\nsocket_path = "/elsewhere.sock"\n')
    assert cli.socket_path_from_config(str(main)) == cli.DEFAULT_SOCKET_PATH
    assert cli.socket_path_from_config(str(tmp_path / "missing.toml")) == cli.DEFAULT_SOCKET_PATH
    # A mistake beside it: the socket path still names where the running gateway listens.
    main.write_text("not = [toml")
    assert cli.socket_path_from_config(str(main)) == f"{tmp_path}/s.sock"
    (tmp_path / "conf.d" / "50-diag.toml").unlink()
    assert cli.socket_path_from_config(str(main)) == cli.DEFAULT_SOCKET_PATH


PLAIN_CASES = [
    '[gateway]\nx = 1\n',
    '[diagnostics]\nsocket_path = "/run/a.sock"\n',
    "[diagnostics]  # the socket\nsocket_group = 'outpost'\n  socket_path = '/run/b.sock'   # why\n",
    '[diagnostics]\nsocket_path = ""\n',
]
TRICKY_CASES = [
    'diagnostics.socket_path = "/run/dotted.sock"\n',
    'diagnostics = { socket_path = "/run/inline.sock" }\n',
    '[gateway]\nsocket_path = "/run/wrong-table.sock"\n[diagnostics]\n',
    '[diagnostics]\nsocket_path = "/run/esc\\u0061.sock"\n',
    '[diagnostics]\nnote = """\nsocket_path = "/run/in-a-string.sock"\n"""\n',
    "[diagnostics]\nnote = \'\'\'\nsocket_path = '/x'\n\'\'\'\nsocket_path = '/run/real.sock'\n",
    '# socket_path = "/run/commented.sock"\n[diagnostics]\n',
    '[diagnostics]\nsocket_path = "/run/a.sock"\nsocket_path = "/run/twice.sock"\n',
    '[ diagnostics ]\nsocket_path = "/run/spaced-header.sock"\n',
    '[diagnostics]\nx = [\n  [1, 2],\n]\nsocket_path = "/run/after-nested-array.sock"\n',
    '[diagnostics]\nsocket_path = 5\n',
    '[diagnostics]\nsocket_path = "/run/x.sock" # "quoted" comment\n',
    '[diagnostics]\nsocket_path = "/run/not-closed.sock\n',
]


def _reference(text: str) -> str:
    """What the file means: tomllib's reading of diagnostics.socket_path."""
    import tomllib

    try:
        value = tomllib.loads(text).get("diagnostics", {}).get("socket_path")
    except tomllib.TOMLDecodeError:
        return cli.DEFAULT_SOCKET_PATH
    return value if isinstance(value, str) and value else cli.DEFAULT_SOCKET_PATH


@pytest.mark.parametrize("text", PLAIN_CASES + TRICKY_CASES)
def test_socket_path_read_fast_means_what_toml_means(tmp_path: Path, text: str) -> None:
    """Plain files are read without tomllib; every file gives what tomllib reads in it."""
    path = tmp_path / "outpost.toml"
    path.write_text(text)
    assert cli.socket_path_from_config(str(path)) == _reference(text)
    understood, _ = cli._plain_socket_path(text)
    assert understood == (text in PLAIN_CASES) or "socket_path" not in text


def test_status_names_the_socket_from_outpost_config(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n[diagnostics]\nsocket_path = "{tmp_path}/x.sock"\n')
    res = _outpost("status", env=dict(os.environ, OUTPOST_CONFIG=str(cfg)))
    assert res.returncode == 1 and f"{tmp_path}/x.sock" in res.stderr


# --- the import set ----------------------------------------------------------------------


def _modules_after(argv: list[str], env: dict[str, str] | None = None) -> set[str]:
    """Run `outpost ARGV` in a fresh interpreter and return sys.modules at its exit."""
    code = textwrap.dedent(f"""
        import atexit, json, sys
        atexit.register(lambda: sys.__stderr__.write("MODULES " + json.dumps(sorted(sys.modules)) + "\\n"))
        sys.argv = ["outpost", *{argv!r}]
        from gateway.cli import main
        sys.exit(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_status_tail_and_version_import_no_models_or_client_libraries(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n[diagnostics]\nsocket_path = "{tmp_path}/s"\n')
    for argv in (["status", "--config", str(cfg)], ["status", "--json"], ["tail", "--config", str(cfg)],
                 ["tail", "--help"], ["--version"], ["status", "--help"]):
        modules = _modules_after(argv)
        assert "gateway.cli" in modules and "gateway.config" not in modules, argv
        assert not _heavy(modules), f"outpost {' '.join(argv)} imported {sorted(_heavy(modules))}"
    # A file that names no socket_path, or names it plainly: not even tomllib is needed.
    plain = tmp_path / "plain.toml"
    plain.write_text('[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n')
    assert "tomllib" not in _modules_after(["status", "--config", str(plain)])
    assert "tomllib" not in _modules_after(["status", "--config", str(cfg)])
    dotted = tmp_path / "dotted.toml"
    dotted.write_text(f'diagnostics.socket_path = "{tmp_path}/s"\n')
    assert "tomllib" in _modules_after(["status", "--config", str(dotted)])
    # The probe: this check sees an import when there is one.
    assert "pydantic" in _modules_after(["check", str(cfg)])


def test_status_against_a_running_gateway_imports_nothing_heavy(tmp_path: Path) -> None:
    cfg = tmp_path / "outpost.toml"
    sock = tmp_path / "outpost.sock"
    cfg.write_text(f"""
[gateway]
group_id = "g"
edge_node_id = "e"
data_dir = "{tmp_path / "data"}"
[diagnostics]
socket_path = "{sock}"
[[devices]]
name = "sim1"
driver = "simulator"
interval = "100ms"
  [[devices.points]]
  name = "ramp"
  waveform = "ramp"
""")
    with open(tmp_path / "gateway.log", "wb") as log:
        gw = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(cfg)], stdout=log,
                              stderr=log, cwd=ROOT)
    try:
        import time

        deadline = time.monotonic() + 60
        while not sock.exists():
            assert gw.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            time.sleep(0.1)
        res = _outpost("status", "--json", "--config", str(cfg))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["gateway"] == "g/e"
        modules = _modules_after(["status", "--config", str(cfg)])
        assert "gateway.diagnostics.client" in modules
        assert not _heavy(modules), sorted(_heavy(modules))
    finally:
        gw.terminate()
        assert gw.wait(timeout=30) == 0


# --- --version ---------------------------------------------------------------------------


def test_version_reports_build_python_and_libraries() -> None:
    from importlib import metadata

    res = _outpost("--version")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == f"outpost {cli.outpost_version()}"
    assert lines[1].startswith("build: ") and "unknown" not in lines[1]  # this checkout's commit
    assert lines[2].startswith(f"python: {sys.version_info.major}.{sys.version_info.minor}.")
    for name in KEY_LIBRARIES:
        assert f"{name}: {metadata.version(name)}" in lines
    assert library_versions(("no-such-distribution-xyz",)) == {"no-such-distribution-xyz": None}


def test_build_info_of_a_source_checkout_is_its_git_head() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    assert build_info() == {"commit": head.stdout.strip(), "source": "source checkout"}


def test_build_info_written_by_the_build_wins(tmp_path: Path) -> None:
    """A copy of the package with gateway/_build_info.py, as build_dist writes it into the wheel."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import build_dist
    finally:
        sys.path.remove(str(ROOT / "deploy"))
    pkg = tmp_path / "gateway"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy2(ROOT / "gateway" / "version.py", pkg / "version.py")
    build_dist.write_build_info(tmp_path, {"commit": "a" * 40, "dirty": True})
    code = "import gateway.version as v; print(v.__file__); print(v.version_report())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(pkg / "version.py"))
    assert re.search(rf"^build: {'a' * 12} \(built \d{{4}}-\d\d-\d\dT[\d:]+Z, with uncommitted changes\)$",
                     out.stdout, re.M), out.stdout


# --- man page and completion -------------------------------------------------------------


def test_man_page_is_valid_roff_with_every_command_option_exit_code_and_variable(tmp_path: Path) -> None:
    page = tmp_path / "outpost.1"
    assert docgen.main(["man", "--version", "9.8.7", "-o", str(page)]) == 0
    text = page.read_text()
    assert text.startswith('.\\"') and '.TH OUTPOST 1 ' in text and '"outpost 9.8.7"' in text
    groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True)
    assert groff.returncode == 0 and not groff.stderr, groff.stderr
    rendered = subprocess.run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u", str(page)],
                              capture_output=True, text=True).stdout
    flat = " ".join(rendered.split())
    for cmd in docgen.commands(docgen.walk())[1:]:
        assert f"outpost {' '.join(cmd.path)}" in flat
        for opt in cmd.options:
            assert opt.flags[-1] in flat
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES", "OUTPOST_CONFIG", "--interval SECONDS"):
        assert section in flat
    assert "redraw the status every --interval seconds" in flat


def _complete(script: Path, *words: str) -> list[str]:
    """What the completion offers after `words` (the last one is the word being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    code = f"""
        source {script}
        COMP_WORDS=(outpost {quoted}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
        _outpost
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return [x for x in proc.stdout.splitlines() if x]


def test_completion_offers_subcommands_options_and_values(tmp_path: Path) -> None:
    script = tmp_path / "outpost"
    assert docgen.main(["completion", "-o", str(script)]) == 0
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    top = [c.path[0] for c in docgen.walk().subcommands]
    assert {"check", "run", "status", "tail", "doctor", "probe", "buffer"} <= set(top)
    assert _complete(script, "") == top
    assert _complete(script, "st") == ["status"]
    assert _complete(script, "buffer", "quarantine", "") == ["list", "export", "retry", "drop"]
    assert {"--json", "--watch", "--interval", "--socket", "--config"} <= set(_complete(script, "status", "--"))
    assert _complete(script, "--config", "x.toml", "tail", "--d") == ["--device"]  # values are skipped
    assert _complete(script, "probe", "modbus", "--table", "h") == ["holding"]
    assert _complete(script, "probe", "modbus", "--scan", "--ho") == ["--host"]  # --scan's value is optional
    (tmp_path / "site.toml").write_text("")
    assert _complete(script, "status", "--config", str(tmp_path / "si")) == [str(tmp_path / "site.toml")]
    assert _complete(script, "check", str(tmp_path / "si")) == [str(tmp_path / "site.toml")]
    assert _complete(script, "status", "--interval", "") == []  # a number: nothing to offer


def test_completion_loads_inside_a_function_as_bash_completion_does(tmp_path: Path) -> None:
    """bash-completion sources the file from inside a function: its tables must be global."""
    script = tmp_path / "outpost"
    docgen.main(["completion", "-o", str(script)])
    code = f"""
        load() {{ . {script}; }}
        load
        COMP_WORDS=(outpost bu); COMP_CWORD=1; _outpost; echo "${{COMPREPLY[*]}}"
        complete -p outpost
    """
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True)
    assert proc.stdout.splitlines() == ["buffer", "complete -F _outpost outpost"], proc.stdout + proc.stderr


def test_installer_installs_the_man_page_and_completion() -> None:
    """From a checkout (no share/ beside deploy/) the installer generates both with the
    installed code; from a tarball it copies the built ones (tests/deploy installs those)."""
    res = subprocess.run([str(ROOT / "deploy" / "install.sh"), "--dry-run", "--prefix", "/opt/o"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "+ /opt/o/venv/bin/python -m gateway.cli.docgen man -o /usr/local/share/man/man1/outpost.1" in res.stdout
    assert ("+ /opt/o/venv/bin/python -m gateway.cli.docgen completion -o "
            "/usr/local/share/bash-completion/completions/outpost") in res.stdout
    res = subprocess.run([str(ROOT / "deploy" / "install.sh"), "--dry-run", "--uninstall"], capture_output=True,
                         text=True)
    assert "rm -f /usr/local/share/man/man1/outpost.1 /usr/local/share/bash-completion/completions/outpost" \
        in res.stdout


@pytest.mark.parametrize("columns", ["50", "132", "", "wide", "0"])
def test_help_width_is_the_one_argparse_would_compute(columns: str) -> None:
    """The parsers find the terminal width without shutil: the same width as argparse's own."""
    code = ("import shutil, sys; from gateway import cli; "
            "print(cli._help_width(), shutil.get_terminal_size().columns - 2)")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, COLUMNS=columns), cwd=ROOT,
                          capture_output=True, text=True)
    ours, argparse_width = proc.stdout.split()
    assert ours == argparse_width
