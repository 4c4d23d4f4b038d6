"""Client libraries' repeated connection errors are logged once per window, new ones always."""

import logging

from common.logs import RepeatFilter


def _rec(msg: str) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, None, None)


def test_repeats_are_dropped_new_messages_pass() -> None:
    f = RepeatFilter(window_s=600)
    assert f.filter(_rec("Unable connect to 127.0.0.1:9092"))
    assert not any(f.filter(_rec("Unable connect to 127.0.0.1:9092")) for _ in range(100))
    assert f.filter(_rec("SASL authentication failed"))
    assert f.suppressed == 100


def test_window_expiry_lets_a_reminder_through() -> None:
    f = RepeatFilter(window_s=0.0)
    assert f.filter(_rec("x")) and f.filter(_rec("x"))


def test_on_the_handler_it_sees_child_loggers_and_leaves_others_alone() -> None:
    import io

    from common.logs import install_handler_filter, setup_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        out = io.StringIO()
        setup_logging("info", "kv", stream=out)
        install_handler_filter(RepeatFilter(prefixes=("aiokafka",)))
        child = logging.getLogger("aiokafka.producer.sender")
        for _ in range(5):
            child.warning("Got error produce response, retrying")
            logging.getLogger("gateway.x").warning("ours")
        lines = out.getvalue().splitlines()
        assert sum("retrying" in line for line in lines) == 1
        assert sum("ours" in line for line in lines) == 5
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
