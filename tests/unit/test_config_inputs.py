"""Issue 13: what `outpost check` accepts runs (items 1, 2 and 6), regression tests.

Every configuration here once passed `outpost check` and then crashed `outpost run`, was
silently coerced, or was used literally; now each is refused with file, line and key path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import BufferSection, parse_config, resolve_secrets, warnings
from gateway.config_build import RuntimeBuildError, build_runtime, load_checked
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.toml"))

BASE = """\
[gateway]
group_id = "g"
edge_node_id = "e"
"""

MODBUS = BASE + """
[[buses]]
name = "a"
transport = "tcp"
host = "127.0.0.1"

[[devices]]
name = "d"
bus = "a"
"""

MQTT = """
[mqtt]
servers = ["mqtts://broker:8883"]
"""

KAFKA = """
[kafka]
bootstrap_servers = ["k:9092"]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "site.toml")
    return exc.value.problems


def only_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# -- item 1: values that passed check and crashed run ----------------------------------------

CRASHED_RUN = [
    (BASE + '[buffer]\nmax_age = "0s"\n', "site.toml:5: buffer.max_age", "greater than 0"),
    (BASE + KAFKA + "batch_max_bytes = 100\n", "site.toml:7: kafka.batch_max_bytes", "1024"),
    (BASE + MQTT + KAFKA + """[[kafka.inbound]]
kafka_topics = ["t"]
group_id = "g1"
action = "mqtt_publish"
mqtt_topic_template = "site/{device}"
""", "site.toml:14: kafka.inbound[0].mqtt_topic_template", "{device}"),
    (BASE + MQTT + KAFKA + """[[kafka.inbound]]
kafka_topics = ["t"]
group_id = "g1"
action = "mqtt_publish"
mqtt_topic_template = "site/+/{key}/#"
""", "site.toml:14: kafka.inbound[0].mqtt_topic_template", "wildcards"),
    (BASE + MQTT + KAFKA + """[[kafka.inbound]]
kafka_topics = ["t"]
group_id = "g1"
action = "mqtt_publish"
mqtt_topic_template = "site/{key:d}"
""", "site.toml:14: kafka.inbound[0].mqtt_topic_template", "format spec"),
    (BASE + KAFKA + """[[kafka.inbound]]
kafka_topics = ["t"]
group_id = ""
action = "device_command"
""", "site.toml:9: kafka.inbound[0].group_id", "at least 1 character"),
    (BASE + MQTT + 'reconnect_min = "0s"\n', "site.toml:7: mqtt.reconnect_min", "greater than 0"),
    (BASE + KAFKA + 'reconnect_min = "2m"\nreconnect_max = "1m"\n', "site.toml:5: kafka:",
     "reconnect_max (60s) must be >= reconnect_min (120s)"),
    (BASE + MQTT + 'keepalive = "1d"\n', "site.toml:7: mqtt.keepalive", "65535"),
    (BASE + '[buffer]\nflush_interval = "0s"\n', "site.toml:5: buffer.flush_interval", "greater than 0"),
]


@pytest.mark.parametrize(("text", "where", "why"), CRASHED_RUN)
def test_values_that_crashed_run_are_refused_with_line_and_path(text: str, where: str, why: str) -> None:
    problem = only_problem(text)
    assert problem.startswith(where), problem
    assert why in problem


def test_inbound_topics_are_each_checked_by_index() -> None:
    problems = problems_of(BASE + KAFKA + """[[kafka.inbound]]
kafka_topics = ["ok", "also bad!", ""]
group_id = "g1"
action = "device_command"
""")
    assert [p.split(": ")[1] for p in problems] == [
        "kafka.inbound[0].kafka_topics[1]", "kafka.inbound[0].kafka_topics[2]"]


@pytest.mark.parametrize(("value", "path", "why"), [
    ('unit_id = "1"', "devices[0].unit_id", "valid integer (write it without quotes)"),
    ('points = [{name = "p", address = 1, writable = "yes", table = "holding"}]',
     "devices[0].points[0].writable", "valid boolean"),
    ('points = [{name = "p", address = 1, scale = nan}]', "devices[0].points[0].scale", "nan and inf"),
    ('points = [{name = "p", address = 1, min = nan}]', "devices[0].points[0].min", "nan and inf"),
    ('points = [{name = "p", address = 1, max = inf}]', "devices[0].points[0].max", "nan and inf"),
    ('points = [{name = "p", address = 1.0}]', "devices[0].points[0].address", "valid integer"),
])
def test_no_silent_coercion_and_no_nan_in_inline_tables(value: str, path: str, why: str) -> None:
    text = MODBUS + value + "\n" + ("" if "points" in value else 'points = [{name = "p", address = 1}]\n')
    problem = only_problem(text)
    # Line 13 is the line of the value inside the inline table, not the [[devices]] header.
    assert problem.startswith(f"site.toml:13: {path}:"), problem
    assert why in problem


def test_lines_inside_multi_line_arrays_of_inline_tables() -> None:
    problem = only_problem(MODBUS + """points = [
  {name = "a", address = 1},
  # a comment, and a [bracket] in a string: "]"
  {name = "b]", address = 2, scale = nan},
]
""")
    assert problem.startswith("site.toml:16: devices[0].points[1].scale"), problem


def test_overlapping_writable_registers_are_refused() -> None:
    problem = only_problem(MODBUS + """
[[devices.points]]
name = "setpoint"
address = 10
type = "float32"
writable = true
[[devices.points]]
name = "limit"
address = 11
writable = true
""")
    assert "devices[0]" in problem and "overlaps writable points[0] ('setpoint')" in problem
    # Reading one register two ways stays allowed; only two writers conflict.
    parse_config(MODBUS + """
[[devices.points]]
name = "raw"
address = 10
[[devices.points]]
name = "setpoint"
address = 10
writable = true
""")


def test_unknown_key_suggests_the_nearest_known_one_in_its_own_table() -> None:
    problems = problems_of(MODBUS + 'points = [{name = "p", adress = 1}]\n')
    assert "site.toml:13: devices[0].points[0].adress: unknown key; did you mean 'address'? (got 1)" in problems
    problem = only_problem(BASE + KAFKA + "batch_max_byte = 2048\n")
    assert "kafka.batch_max_byte: unknown key; did you mean 'batch_max_bytes'?" in problem
    problem = only_problem(BASE + '[[buses]]\nname = "s"\ntransport = "rtu"\nport = "/dev/x"\nparty = "E"\n')
    assert "did you mean 'parity'?" in problem


def test_deep_nesting_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    deep = BASE + "x = " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(ConfigError) as exc:
        parse_config(deep, "deep.toml")
    assert "nested too deeply" in str(exc.value)
    f = tmp_path / "deep.toml"
    f.write_text(deep)
    res = _outpost("check", str(f))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nested too deeply" in res.stderr


def test_duplicate_mapping_and_inbound_names_are_refused() -> None:
    problems = problems_of(BASE + KAFKA + """
[[kafka.mappings]]
name = "m"
mqtt_topic_filters = ["a/#"]
kafka_topic = "t1"
[[kafka.mappings]]
name = "m"
mqtt_topic_filters = ["b/#"]
kafka_topic = "t2"
[[kafka.inbound]]
name = "inbound-1"
kafka_topics = ["c"]
group_id = "g"
action = "device_command"
[[kafka.inbound]]
kafka_topics = ["c"]
group_id = "g"
action = "device_command"
""")
    assert any(p.startswith("site.toml:13: kafka.mappings[1].name") for p in problems), problems
    assert any("kafka.inbound[1].name: 'inbound-1' is already used" in p for p in problems), problems


def test_text_encodings_that_are_not_text_are_refused() -> None:
    problem = only_problem(MODBUS + 'points = [{name = "p", address = 1, type = "string", length = 2, '
                                    'encoding = "rot13"}]\n')
    assert "not a text encoding" in problem


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_builds_every_runtime_object(path: Path) -> None:
    res = load_checked(path, secrets=False)  # the examples name secret files of a real install
    assert res.ok, res.problems
    rt = res.runtime
    assert rt is not None and rt.buffer is not None and rt.node is not None
    assert len(rt.drivers) >= 1
    assert (rt.mqtt is not None) == (res.config.mqtt is not None)
    assert len(rt.inbound) == (len(res.config.kafka.inbound) if res.config.kafka else 0)


def test_a_runtime_object_that_cannot_be_built_is_named_by_key_path() -> None:
    # model_construct skips validation: this is what a gap in the models would let through.
    cfg = parse_config(BASE)
    bad = cfg.model_copy(update={"buffer": BufferSection.model_construct(**{
        **cfg.buffer.model_dump(), "max_age": 0.0, "max_size_bytes": cfg.buffer.max_size_bytes})})
    with pytest.raises(RuntimeBuildError) as exc:
        build_runtime(bad)
    assert exc.value.problems[0][0] == ["buffer"]
    assert "max_age_s" in exc.value.problems[0][1]


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00", b"[gateway\n", b"x = " + b"[" * 3000])
def test_load_checked_never_raises(tmp_path: Path, content: bytes | None) -> None:
    f = tmp_path / "c.toml"
    if content is not None:
        f.write_bytes(content)
    res = load_checked(f)
    assert not res.ok and res.config is None and res.problems
    assert all(p.startswith(str(f)) for p in res.problems), res.problems
    assert load_checked(tmp_path).problems  # a directory


# -- item 2: ${VAR} ------------------------------------------------------------------------


def test_env_references_outside_secret_keys_are_refused_with_path() -> None:
    problems = problems_of(BASE.replace('"e"', '"${HOSTNAME}"') + """
[mqtt]
servers = ["mqtts://${BROKER}:8883"]
""")
    assert problems[0].startswith("site.toml:3: gateway.edge_node_id: '${HOSTNAME}' holds a ${VAR} reference")
    assert problems[1].startswith("site.toml:6: mqtt.servers[0]:")
    assert all("mqtt.password and kafka.sasl_password" in p for p in problems)


def test_env_references_in_secret_keys_resolve_and_name_an_unset_variable() -> None:
    text = BASE + MQTT + 'password = "${MQTT_PW}"\n' + KAFKA + """security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "u"
sasl_password = "pre-${KAFKA_PW}"
"""
    cfg = parse_config(text, "site.toml")
    secrets = resolve_secrets(cfg, {"MQTT_PW": "a", "KAFKA_PW": "b"}, "site.toml", text=text)
    assert (secrets.mqtt_password, secrets.kafka_sasl_password) == ("a", "pre-b")
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(cfg, {}, "site.toml", text=text)
    assert exc.value.problems == [
        "site.toml:7: mqtt.password: environment variable MQTT_PW is not set",
        "site.toml:14: kafka.sasl_password: environment variable KAFKA_PW is not set",
    ]
    # Without --secrets, check names it as a warning (its shell is not the service's environment).
    assert any("mqtt.password: environment variable MQTT_PW is not set" in w for w in warnings(cfg, {}))
    assert only_problem(BASE + MQTT + 'password = "${1BAD}"\n').startswith("site.toml:7: mqtt.password: malformed")


def test_cli_check_with_secrets_names_the_unset_variable(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(BASE + MQTT + 'password = "${OUTPOST_TEST_SURELY_UNSET}"\n')
    res = _outpost("check", "--secrets", str(f))
    assert res.returncode == 2
    assert f"{f}:7: mqtt.password: environment variable OUTPOST_TEST_SURELY_UNSET is not set" in res.stderr
    res = _outpost("check", str(f))
    assert res.returncode == 0 and "warning: mqtt.password: environment variable" in res.stdout


# -- item 6: credentials in clear ------------------------------------------------------------


def test_cleartext_credentials_warn_naming_the_key_and_exit_zero(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(BASE + """
[mqtt]
servers = ["mqtt://broker:1883"]
username = "u"
password_file = "/etc/outpost/mqtt.pw"
[kafka]
bootstrap_servers = ["k:9092"]
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "PLAIN"
sasl_username = "u"
sasl_password = "${PW}"
""")
    res = _outpost("check", str(f))
    assert res.returncode == 0, res.stderr
    assert "warning: mqtt.password_file: the password is sent in clear text to mqtt://broker:1883" in res.stdout
    assert 'warning: kafka.sasl_password: security_protocol "SASL_PLAINTEXT" with sasl_mechanism "PLAIN"' in res.stdout


def test_no_cleartext_warning_over_tls() -> None:
    cfg = parse_config(BASE + MQTT + 'password = "${PW}"\n' + KAFKA + """security_protocol = "SASL_SSL"
sasl_mechanism = "PLAIN"
sasl_username = "u"
sasl_password = "${PW}"
""")
    assert not [w for w in warnings(cfg, {"PW": "x"}) if "clear" in w or "TLS" in w]


def _outpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT)


# -- optional: conf.d drop-ins and the JSON Schema ------------------------------------------------


def _site(tmp_path: Path) -> Path:
    main = tmp_path / "outpost.toml"
    main.write_text(MODBUS + 'points = [{name = "p", address = 1}]\n')
    (tmp_path / "conf.d").mkdir()
    return main


def test_dropins_add_tables_and_devices_in_name_order(tmp_path: Path) -> None:
    main = _site(tmp_path)
    (tmp_path / "conf.d" / "20-meter.toml").write_text(
        '[[devices]]\nname = "m2"\nbus = "a"\npoints = [{name = "v", address = 2}]\n')
    (tmp_path / "conf.d" / "10-mqtt.toml").write_text('[mqtt]\nservers = ["mqtts://b:8883"]\n')
    (tmp_path / "conf.d" / "README").write_text("not a drop-in")
    res = load_checked(main, secrets=False)
    assert res.ok, res.problems
    assert [d.name for d in res.config.devices] == ["d", "m2"]
    assert res.config.mqtt is not None
    dropins = tmp_path / "conf.d"
    assert res.files == [str(main), str(dropins / "10-mqtt.toml"), str(dropins / "20-meter.toml")]
    out = _outpost("check", str(main))
    assert out.returncode == 0 and "merged drop-in" in out.stdout and "20-meter.toml" in out.stdout


def test_a_problem_in_a_dropin_names_that_file_its_line_and_the_merged_path(tmp_path: Path) -> None:
    main = _site(tmp_path)
    (tmp_path / "conf.d" / "20-meter.toml").write_text(
        '# second meter\n[[devices]]\nname = "m2"\nbus = "a"\nunit_id = "7"\npoints = [{name = "v", address = 2}]\n')
    res = load_checked(main)
    assert res.problems == [f"{tmp_path / 'conf.d' / '20-meter.toml'}:5: devices[1].unit_id: Input should be a "
                            "valid integer (write it without quotes) (got '7')"]


def test_a_key_set_in_two_files_is_refused_naming_both(tmp_path: Path) -> None:
    main = _site(tmp_path)
    (tmp_path / "conf.d" / "10-id.toml").write_text('[gateway]\nedge_node_id = "other"\n')
    res = load_checked(main)
    assert len(res.problems) == 1
    assert res.problems[0].startswith(f"{tmp_path / 'conf.d' / '10-id.toml'}:2: gateway.edge_node_id: also set in "
                                      f"{main}:3")


def test_schema_is_json_with_durations_as_the_file_writes_them() -> None:
    import json

    out = _outpost("check", "--schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["required"] == ["gateway"]
    max_age = schema["$defs"]["BufferSection"]["properties"]["max_age"]
    assert max_age["type"] == "string" and max_age["default"] == "7d"
    assert schema["$defs"]["BufferSection"]["additionalProperties"] is False


@pytest.mark.parametrize(("text", "path"), [
    (BASE + KAFKA + '[[kafka.inbound]]\nkafka_topics = ["a"]\ngroup_id = "x"\naction = "device_command"\nqos = true\n',
     "kafka.inbound[0].qos"),
    (BASE + '[[buses]]\nname = "b"\ntransport = "rtu"\nport = "/dev/x"\nstopbits = 1.0\n', "buses[0].stopbits"),
    (MODBUS + 'address_base = true\npoints = [{name = "p", address = 1}]\n', "devices[0].address_base"),
    (BASE + '[gateway.x]\n', "gateway.x"),
    (BASE.replace('edge_node_id = "e"', 'edge_node_id = "e"\ndata_dir = ""'), "gateway.data_dir"),
    (BASE + MQTT + 'ca_file = ""\n', "mqtt.ca_file"),
])
def test_integer_choices_take_no_booleans_or_floats_and_paths_are_not_empty(text: str, path: str) -> None:
    problem = only_problem(text)
    assert f": {path}: " in problem, problem


def test_the_file_a_reload_reads_is_refused_before_anything_stops(tmp_path: Path) -> None:
    # Gateway.reload() calls load_config (or load_checked) before it stops the pipeline: the
    # SIGHUP that once killed the gateway with batch_max_bytes = 100 is now a refused reload.
    from gateway.config import load_config

    f = tmp_path / "outpost.toml"
    f.write_text(BASE + KAFKA + "batch_max_bytes = 100\n")
    with pytest.raises(ConfigError, match=r"kafka\.batch_max_bytes"):
        load_config(f)
    res = load_checked(f)
    assert not res.ok and res.config is None and "kafka.batch_max_bytes" in res.problems[0]
