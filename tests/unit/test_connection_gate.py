"""The connection cap's bookkeeping (who is pushed out, who is refused) and the open-files arithmetic."""

from __future__ import annotations

import resource
from typing import Any, cast

from meds_service.server import (
    RESERVED_FDS,
    RESERVED_FDS_PER_WORKER,
    BoundedHttpProtocol,
    ConnectionGate,
    ConnectionLimits,
    connection_cap,
    raise_open_files_limit,
)


class Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Connection:
    """What the gate touches of a connection: its transport."""

    def __init__(self) -> None:
        self.transport = Transport()


def gate(max_connections: int) -> ConnectionGate:
    limits = ConnectionLimits(header_timeout_s=1, body_timeout_s=1, max_connections=max_connections, max_requests=1)
    return ConnectionGate(limits)


def connection() -> Any:
    return cast(BoundedHttpProtocol, Connection())


def test_at_the_cap_a_new_connection_pushes_out_the_oldest_idle_one() -> None:
    g = gate(3)
    first, second, third, fourth = (connection() for _ in range(4))
    for c in (first, second, third):
        assert g.admit(c)
    g.busy(first)
    assert g.admit(fourth)
    assert second.transport.closed and not first.transport.closed and not third.transport.closed
    assert g.open == {first, third, fourth} and g.evicted == 1


def test_a_connection_idle_again_after_its_request_is_the_last_to_go() -> None:
    g = gate(2)
    first, second, third = (connection() for _ in range(3))
    g.admit(first)
    g.admit(second)
    g.busy(first)
    g.waiting(first)  # its response is sent: idle again, and now the most recent
    assert g.admit(third)
    assert second.transport.closed and not first.transport.closed


def test_when_every_connection_is_busy_a_new_one_is_refused_until_one_leaves() -> None:
    g = gate(2)
    first, second, third = (connection() for _ in range(3))
    for c in (first, second):
        g.admit(c)
        g.busy(c)
    assert not g.admit(third)
    assert g.refused == 1 and third not in g.open
    g.leave(first)
    assert g.admit(third)


def test_a_connection_that_left_is_never_pushed_out_again() -> None:
    g = gate(1)
    first, second = connection(), connection()
    g.admit(first)
    g.leave(first)
    g.waiting(first)  # a late callback after it closed does not bring it back
    assert g.admit(second) and g.evicted == 0


def test_the_cap_leaves_descriptors_free_for_the_store_and_workers() -> None:
    reserved = RESERVED_FDS + 2 * RESERVED_FDS_PER_WORKER
    assert connection_cap(4096, 1_048_576, 2) == 4096
    assert connection_cap(4096, 1024, 2) == 1024 - reserved
    assert connection_cap(4096, 100, 2) == 50  # a tiny limit: half of it stays free
    assert connection_cap(4096, resource.RLIM_INFINITY, 2) == 4096


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    _, after = raise_open_files_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert after == soft
    assert hard == resource.RLIM_INFINITY or soft == hard
