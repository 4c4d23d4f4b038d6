"""Sparkplug B topic names: building and parsing `spBv1.0/<group>/<TYPE>/<edge>[/<device>]`.

Pure. STATE topics are `spBv1.0/STATE/<host_id>` (Sparkplug 3.0.0; the 2.2 form without the
namespace is not used).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.sparkplug.errors import TopicError

NAMESPACE = "spBv1.0"


class MessageType(enum.StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    NDATA = "NDATA"
    DDATA = "DDATA"
    NCMD = "NCMD"
    DCMD = "DCMD"
    STATE = "STATE"


NODE_TYPES = frozenset({MessageType.NBIRTH, MessageType.NDEATH, MessageType.NDATA, MessageType.NCMD})
DEVICE_TYPES = frozenset(
    {MessageType.DBIRTH, MessageType.DDEATH, MessageType.DDATA, MessageType.DCMD}
)


def check_id(value: str, what: str) -> str:
    """Group, edge node, device and host ids are topic levels: no '/', '+', '#', not empty."""
    if not value or any(c in value for c in "/+#"):
        raise TopicError(f"{what} {value!r} cannot be a Sparkplug id: it must be non-empty "
                         "and contain no '/', '+' or '#'")
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    message_type: MessageType
    group_id: str = ""
    edge_node_id: str = ""
    device_id: str | None = None
    host_id: str | None = None   # STATE only

    def __str__(self) -> str:
        if self.message_type is MessageType.STATE:
            return f"{NAMESPACE}/STATE/{self.host_id}"
        base = f"{NAMESPACE}/{self.group_id}/{self.message_type}/{self.edge_node_id}"
        return base if self.device_id is None else f"{base}/{self.device_id}"


def node_topic(group_id: str, message_type: MessageType, edge_node_id: str) -> str:
    if message_type not in NODE_TYPES:
        raise TopicError(f"{message_type} is not an edge node message type")
    return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}"


def device_topic(group_id: str, message_type: MessageType, edge_node_id: str, device_id: str) -> str:
    if message_type not in DEVICE_TYPES:
        raise TopicError(f"{message_type} is not a device message type")
    return f"{NAMESPACE}/{group_id}/{message_type}/{edge_node_id}/{device_id}"


def state_topic(host_id: str) -> str:
    return f"{NAMESPACE}/STATE/{check_id(host_id, 'primary host id')}"


def parse_topic(topic: str) -> Topic:
    """Parse a Sparkplug B topic; raises TopicError naming the topic when it is not one."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != NAMESPACE:
        raise TopicError(f"{topic!r} is not a Sparkplug B topic (expected '{NAMESPACE}/...')")
    if parts[1] == "STATE" and len(parts) == 3:
        return Topic(MessageType.STATE, host_id=check_id(parts[2], "host id"))
    if len(parts) not in (4, 5):
        raise TopicError(f"{topic!r}: expected {NAMESPACE}/<group>/<TYPE>/<edge>[/<device>]")
    try:
        mtype = MessageType(parts[2])
    except ValueError:
        raise TopicError(f"{topic!r}: unknown message type {parts[2]!r}") from None
    device = parts[4] if len(parts) == 5 else None
    if (device is None) != (mtype in NODE_TYPES):
        raise TopicError(f"{topic!r}: {mtype} {'needs' if device is None else 'takes no'} device id")
    for value, what in ((parts[1], "group id"), (parts[3], "edge node id")):
        check_id(value, what)
    if device is not None:
        check_id(device, "device id")
    return Topic(mtype, parts[1], parts[3], device)
