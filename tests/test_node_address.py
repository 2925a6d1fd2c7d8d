"""What a node advertises: never a wildcard address that no peer can dial."""

from __future__ import annotations

import pytest

from lowband.node import address
from lowband.node.address import advertised_address, route_source


def test_a_specific_listen_host_is_advertised_with_the_bound_port() -> None:
    assert advertised_address("10.231.0.7:0", 41234, "", "10.231.0.1:7000") == "10.231.0.7:41234"


def test_advertise_wins_and_must_be_dialable() -> None:
    assert advertised_address("0.0.0.0:7100", 7100, "node-a.example:7100", "127.0.0.1:7000") == "node-a.example:7100"
    with pytest.raises(ValueError, match="--advertise"):
        advertised_address("0.0.0.0:7100", 7100, "0.0.0.0:7100", "127.0.0.1:7000")
    with pytest.raises(ValueError, match="HOST:PORT"):
        advertised_address("0.0.0.0:7100", 7100, "no-port", "127.0.0.1:7000")


@pytest.mark.parametrize("listen", ["0.0.0.0:7100", ":7100", "[::]:7100"])
def test_a_wildcard_listen_advertises_the_interface_that_reaches_the_coordinator(listen: str) -> None:
    assert advertised_address(listen, 7100, "", "127.0.0.1:7000") == "127.0.0.1:7100"
    assert route_source("127.0.0.2:7000") == "127.0.0.1"


def test_a_wildcard_listen_without_a_route_is_refused_naming_advertise(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(coordinator: str) -> str:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(address, "route_source", unreachable)
    with pytest.raises(ValueError, match=r"could not be found .*Network is unreachable.*give --advertise HOST:PORT"):
        advertised_address("0.0.0.0:7100", 7100, "", "10.231.0.1:7000")
