"""SimUnit.set_value stores values as a device keeps them (what the template tests serve)."""

from drivers.modbus import codec
from drivers.modbus.simserver import SimUnit


def test_set_value_encodes_scales_and_sets_bits() -> None:
    u = SimUnit()
    u.set_value("input", 0, "float32", 231.5, "CDAB")
    assert [u.tables["input"][a] for a in (0, 1)] == codec.encode("float32", 231.5, "CDAB")
    u.set_value("holding", 10, "int16", -42.5, scale=0.01)          # stored as -4250
    assert codec.decode("int16", [u.tables["holding"][10]]) == -4250
    u.set_value("holding", 11, "uint16", 0x0024)
    u.set_value("holding", 11, "bool", True, bit=0)                   # the other bits stay
    u.set_value("holding", 11, "bool", False, bit=2)
    assert u.tables["holding"][11] == 0x0021
    u.set_value("holding", 20, "string", "AB", length=2)
    assert [u.tables["holding"][20], u.tables["holding"][21]] == [0x4142, 0]
    u.set_value("coil", 3, "bool", 1)
    assert u.tables["coil"][3] is True
