"""Configuration loading: every problem reported at once, with file, key path and line."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.units import format_duration, parse_duration
from gateway.config import (
    load_config,
    parse_config,
    parse_host_port,
    parse_server_url,
    resolve_secrets,
    validate_topic_filter,
)
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(glob.glob(str(ROOT / "deploy" / "examples" / "*.toml")))

MINIMAL = """
[gateway]
group_id = "g"
edge_node_id = "e"
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "site.toml")
    return exc.value.problems


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: Path(p).name)
def test_every_example_config_validates(path: str) -> None:
    cfg = load_config(path)
    assert cfg.gateway.group_id


def test_examples_exist() -> None:
    names = {Path(p).name for p in EXAMPLES}
    assert {"outpost.toml", "demo.toml"} <= names


def test_minimal_config_gets_field_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.buffer.when_full == "drop_oldest"
    assert cfg.buffer.synchronous == "full"
    assert cfg.buffer.max_age == 7 * 86400
    assert cfg.mqtt is None and cfg.kafka is None
    assert cfg.summary()["uplinks"] == []


def test_three_mistakes_are_all_reported_with_paths_and_lines() -> None:
    text = MINIMAL + """
[[buses]]
name = "a"
transport = "tcp"
host = "127.0.0.1"

[[devices]]
name = "m1"
bus = "a"
  [[devices.points]]
  name = "ok"
  address = 1
  [[devices.points]]
  name = "x"
  address = 3
  type = "float33"

[[devices]]
name = "m2"
bus = "nope"
timout = "1s"
  [[devices.points]]
  name = "z"
  address = 1
"""
    problems = problems_of(text)
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert "devices[0].points[1].type" in joined and "float33" in joined
    assert "devices[1].timout: unknown key" in joined
    assert "devices[1].bus: 'nope' names no bus" in joined
    # Line numbers point at the offending keys.
    lines = text.splitlines()
    for p in problems:
        lineno = int(p.split(":")[1])
        assert lines[lineno - 1].strip().split(" ")[0] in {"type", "timout", "bus"}, p


def test_durations_need_units_and_sizes_are_bytes() -> None:
    problems = problems_of(MINIMAL + '\n[buffer]\nmax_age = 7\nmax_size_bytes = "1GB"\n')
    assert any("buffer.max_age" in p and "unit" in p for p in problems)
    assert any("buffer.max_size_bytes" in p and "bytes" in p for p in problems)
    assert parse_duration("800ms") == pytest.approx(0.8)
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("2h") == 7200
    assert format_duration(0.8) == "800ms" and format_duration(604800) == "7d"
    for bad in ("7", "7 years", "", "-1s", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_unknown_section_and_bad_toml() -> None:
    assert any("mqttt: unknown key" in p for p in problems_of(MINIMAL + "\n[mqttt]\nservers=[]\n"))
    problems = problems_of("[gateway\n")
    assert "not valid TOML" in problems[0]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.toml")
    assert "file not found" in str(exc.value)


def test_sparkplug_ids_and_duplicates() -> None:
    text = MINIMAL.replace('"e"', '"e/1"') + """
[[devices]]
driver = "simulator"
name = "d 1"
  [[devices.points]]
  name = "p"
[[devices]]
driver = "simulator"
name = "d 1"
  [[devices.points]]
  name = "p"
"""
    joined = "\n".join(problems_of(text))
    assert "gateway.edge_node_id" in joined
    assert "cannot be a Sparkplug device id" in joined
    assert "already used by devices[0]" in joined


def test_kafka_security_needs_credentials() -> None:
    text = MINIMAL + """
[kafka]
bootstrap_servers = ["k:9093"]
security_protocol = "SASL_SSL"
"""
    assert any("needs sasl_mechanism" in p for p in problems_of(text))
    bad_filter = MINIMAL + """
[kafka]
bootstrap_servers = ["k:9093"]
[[kafka.mappings]]
mqtt_topic_filters = ["a/#/b"]
kafka_topic = "t t"
"""
    joined = "\n".join(problems_of(bad_filter))
    assert "kafka.mappings[0].mqtt_topic_filters" in joined
    assert "kafka.mappings[0].kafka_topic" in joined


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret\n")
    text = MINIMAL + f"""
[mqtt]
servers = ["mqtts://b:8883"]
username = "u"
password = "${{MQTT_PW}}"
[kafka]
bootstrap_servers = ["k:9093"]
security_protocol = "SASL_SSL"
sasl_mechanism = "PLAIN"
sasl_username = "u"
sasl_password_file = "{secret}"
"""
    cfg = parse_config(text)
    s = resolve_secrets(cfg, env={"MQTT_PW": "hunter2"})
    assert s.mqtt_password == "hunter2" and s.kafka_sasl_password == "s3cret"
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(cfg, env={})
    assert "MQTT_PW is not set" in str(exc.value)


def test_url_and_filter_parsers() -> None:
    assert parse_server_url("mqtts://broker:8883").tls
    u = parse_server_url("broker")
    assert (u.host, u.port, u.tls) == ("broker", 1883, False)
    assert parse_host_port("[::1]:9092") == ("::1", 9092)
    for bad in ("http://x", "a b"):
        with pytest.raises(ValueError):
            parse_server_url(bad)
    with pytest.raises(ValueError):
        parse_host_port("kafka")
    assert validate_topic_filter("spBv1.0/+/DDATA/#")
    for bad in ("a/#/b", "a+/b", ""):
        with pytest.raises(ValueError):
            validate_topic_filter(bad)


def _outpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_check_exit_codes(tmp_path: Path) -> None:
    ok = _outpost("check", *EXAMPLES)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": ok") == len(EXAMPLES)
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "\n[buffer]\nwhen_full = \"explode\"\n")
    res = _outpost("check", "--config", str(bad))
    assert res.returncode == 2
    assert "buffer.when_full" in res.stderr and "drop_oldest" in res.stderr
    assert _outpost("--version").stdout.startswith("outpost ")


def test_check_warns_about_json_on_bridged_non_sparkplug_topics() -> None:
    from gateway.config import warnings

    cfg = parse_config(MINIMAL + """
[mqtt]
servers = ["mqtt://b"]
[kafka]
bootstrap_servers = ["k:9092"]
[[kafka.mappings]]
mqtt_topic_filters = ["site/#"]
kafka_topic = "t"
format = "json"
subscribe = true
""")
    assert any("kafka.mappings[0]" in w and "raw" in w for w in warnings(cfg))


def test_buffer_open_check_can_be_turned_off_for_big_files_on_sd_cards() -> None:
    assert parse_config(MINIMAL + '\n[buffer]\ncheck_on_open = "none"\n').buffer.check_on_open == "none"
    assert any("buffer.check_on_open" in p for p in problems_of(MINIMAL + '\n[buffer]\ncheck_on_open = "full"\n'))
