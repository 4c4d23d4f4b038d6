"""The status page's configuration keys: loopback unless allowed, and then a token from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import parse_config, resolve_secrets
from gateway.errors import ConfigError

BASE = """
[gateway]
group_id = "g"
edge_node_id = "e"
data_dir = "/tmp/x"

[diagnostics]
"""


def test_loopback_is_the_default_and_beyond_it_is_refused() -> None:
    cfg = parse_config(BASE + 'metrics_listen = "127.0.0.1:9108"\n')
    assert cfg.diagnostics.page is True and cfg.diagnostics.allow_remote is False
    with pytest.raises(ConfigError, match=r"diagnostics.*only on loopback.*allow_remote"):
        parse_config(BASE + 'metrics_listen = "0.0.0.0:9108"\n')


def test_allow_remote_needs_a_token_file() -> None:
    with pytest.raises(ConfigError, match="allow_remote = true needs token_file"):
        parse_config(BASE + 'metrics_listen = "0.0.0.0:9108"\nallow_remote = true\n')
    cfg = parse_config(BASE + 'metrics_listen = "0.0.0.0:9108"\nallow_remote = true\ntoken_file = "/etc/t"\n')
    assert cfg.diagnostics.token_file == "/etc/t"


def test_the_token_is_read_from_its_file_and_a_short_one_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef01234567\n")
    text = BASE + f'metrics_listen = "0.0.0.0:9108"\nallow_remote = true\ntoken_file = "{token}"\n'
    assert resolve_secrets(parse_config(text)).diagnostics_token == "0123456789abcdef01234567"
    token.write_text("short\n")
    with pytest.raises(ConfigError, match=r"diagnostics\.token_file.*fewer than 16"):
        resolve_secrets(parse_config(text))
    token.unlink()
    with pytest.raises(ConfigError, match=r"diagnostics\.token_file.*cannot read"):
        resolve_secrets(parse_config(text))
