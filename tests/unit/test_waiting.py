"""Arrival: how a posted exchange is waited for, without a process group."""

import time

from hf_gasloc.fabric.waiting import Arrival, Refused


class Work:
    """A posted operation that records when it is waited for."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(self.name)


def test_a_blocking_backend_waits_when_the_caller_joins_not_when_it_posts():
    log = []
    arrival = Arrival(header_works=[Work(log, "header")],
                      then=lambda: [Work(log, "messages")])
    arrival.wait_in_background(time.perf_counter(), blocking=True)  # NCCL: posting
    assert log == []  # posting never waits for the peer
    assert arrival.join(time.perf_counter() + 1) and log == ["header", "messages"]
    assert arrival.join(time.perf_counter() + 1) and log == ["header", "messages"]  # once


def test_a_refused_header_is_an_error_and_its_messages_are_never_posted():
    log = []

    def refuse():
        raise Refused("another layout")

    for blocking in (True, False):
        arrival = Arrival(header_works=[Work(log, "header")], then=refuse)
        arrival.wait_in_background(time.perf_counter(), blocking=blocking)
        assert not arrival.join(time.perf_counter() + 5)
        assert arrival.error == "another layout"
    assert log == ["header", "header"]
