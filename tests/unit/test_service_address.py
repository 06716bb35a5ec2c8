"""--move-address: what is accepted, and the announcements as the link sees them."""

import ipaddress
import struct

import pytest

from livemig import config, service_address
from livemig.errors import UsageError


def test_an_address_with_its_prefix_is_said_back_plain_and_anything_else_is_one_clear_line():
    assert service_address.parse("198.18.0.100/24") == "198.18.0.100/24"
    assert service_address.parse("fd00:0::64/64") == "fd00::64/64"
    for bad, said in (("198.18.0.100", "give the prefix too"), ("198.18.0.300/24", "not an IP address"),
                      ("web1/24", "not an IP address"), ("127.0.0.1/8", "loopback"),
                      ("0.0.0.0/0", "wildcard"), ("fe80::1/64", "link-local"), ("224.0.0.1/4", "multicast")):
        with pytest.raises(UsageError, match=said):
            service_address.parse(bad)


def test_the_setting_takes_a_list_or_a_comma_separated_string_and_writes_back_as_toml():
    assert config._addresses(["198.18.0.100/24"]) == ("198.18.0.100/24",)
    assert config._addresses("198.18.0.100/24, 198.18.0.101/24") == ("198.18.0.100/24", "198.18.0.101/24")
    with pytest.raises(ValueError, match="give the prefix"):
        config._addresses(["198.18.0.100"])
    assert config.toml_value(("198.18.0.100/24",)) == '["198.18.0.100/24"]'
    # a flag names itself as typed
    with pytest.raises(UsageError, match="^--move-address: 10.0.0.1: give the prefix"):
        config.Config().with_flags(move_addresses=["10.0.0.1"])


def test_a_gratuitous_arp_says_the_address_is_at_this_mac_as_a_request_and_a_reply():
    ip, mac = ipaddress.ip_address("198.18.0.100").packed, bytes.fromhex("02aabbccddee")
    frames = service_address.garp_frames(ip, mac)
    assert len(frames) == 2
    for frame, op in zip(frames, (1, 2), strict=True):
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
        htype, ptype, hlen, plen, oper, sha, spa, _tha, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:])
        assert (htype, ptype, hlen, plen, oper) == (1, 0x0800, 6, 4, op)
        assert (sha, spa, tpa) == (mac, ip, ip)      # sender and target the same address: gratuitous


def test_an_unsolicited_neighbour_advertisement_overrides_and_names_the_mac():
    ip, mac = ipaddress.ip_address("fd00::64").packed, bytes.fromhex("02aabbccddee")
    na = service_address.unsolicited_na(ip, mac)
    kind, code, _checksum, flags, target = struct.unpack("!BBHI16s", na[:24])
    assert (kind, code, target) == (136, 0, ip)
    assert flags & 0x20000000 and not flags & 0x40000000    # Override set, Solicited not
    assert na[24:] == bytes([2, 1]) + mac                   # the target link-layer address option
