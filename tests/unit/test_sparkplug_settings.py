"""The MQTT uplink's settings come from the [gateway] and [mqtt] sections of the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.sparkplug.errors import SparkplugError
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink


def test_settings_from_config(tmp_path: Path) -> None:
    path = tmp_path / "outpost.toml"
    path.write_text(
        '[gateway]\ngroup_id = "plant-7"\nedge_node_id = "pump-3"\n'
        f'data_dir = "{tmp_path}"\n\n'
        '[mqtt]\nservers = ["mqtts://broker.example:8883", "mqtt://backup:1883"]\n'
        'primary_host_id = "scada-1"\nusername = "edge"\nkeepalive = "15s"\n'
        'data_qos = 0\nuse_aliases = false\nprotocol = "3.1.1"\n'
    )
    s = MqttUplinkSettings.from_config(load_config(path), mqtt_password="secret")
    assert (s.group_id, s.edge_node_id, s.data_dir) == ("plant-7", "pump-3", str(tmp_path))
    assert s.servers == ["mqtts://broker.example:8883", "mqtt://backup:1883"]
    assert s.primary_host_id == "scada-1" and s.username == "edge" and s.password == "secret"
    assert s.keepalive == 15.0 and s.data_qos == 0
    assert s.use_aliases is False and s.protocol == "3.1.1"


def test_a_bad_server_url_fails_at_construction(tmp_path: Path) -> None:
    s = MqttUplinkSettings("g", "e", str(tmp_path), ["mqtt://ok:1883", "http://bad host"])

    async def write(*_a: object) -> None:
        pass

    with pytest.raises(SparkplugError, match="'http://bad host'"):
        SparkplugUplink(s, buffer=None, devices={}, write_cb=write)
