"""An in-process fabric for the fast tier: workers as threads, messages as copies, faults injected.

``FakeNetwork(n)`` gives each of ``n`` workers a ``FakeComm`` with the methods of
``hf_gasloc.fabric.Comm`` that the engine uses; ``run_workers(fn, n)`` runs
``fn(rank, comm)`` on ``n`` threads and returns their results (or raises the
first error, with its rank). Point-to-point messages are copied into the
receiver's mailbox when posted; collectives meet at a rendezvous and every
worker sums the contributions in rank order. ``Fault`` rules drop, delay,
corrupt or fail a given message, in the spirit of torchft's event injector.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hf_gasloc.errors import PeerLostError
from hf_gasloc.fabric import Arrival, PendingSwap
from hf_gasloc.fabric.waiting import Refused


@dataclass
class Fault:
    """What happens to the point-to-point messages from ``sender`` (to ``receiver``, if set)
    posted on or after its ``after``-th swap with that peer (0-based), ``times`` times at most.

    ``kind``: ``drop`` (never delivered), ``delay`` (delivered ``seconds`` later),
    ``nan`` (every message tensor filled with NaN), ``fail`` (the receiver's wait
    raises, as a broken connection does).
    """

    kind: str
    sender: int
    receiver: int | None = None
    after: int = 0
    times: int = 1_000_000
    seconds: float = 0.0
    hits: int = field(default=0, init=False)

    def applies(self, sender: int, receiver: int, swap: int) -> bool:
        return (sender == self.sender and self.receiver in (None, receiver)
                and swap >= self.after and self.hits < self.times)


class _Work:
    """A posted receive: ``wait`` blocks until the message is in the mailbox, then copies the
    header, asks ``check`` whether the rest fits, and copies the rest."""

    def __init__(self, network: "FakeNetwork", key: tuple, buffers: list[torch.Tensor], check):
        self.network, self.key, self.buffers, self.check = network, key, buffers, check

    def wait(self) -> None:
        with self.network.changed:
            while self.key not in self.network.mailbox:
                self.network.changed.wait()
            delivered = self.network.mailbox.pop(self.key)
        if isinstance(delivered, Exception):
            raise delivered
        if delivered[0].shape != self.buffers[0].shape:
            raise RuntimeError("a header of another size (gloo would abort here)")
        self.buffers[0].copy_(delivered[0])
        refusal = self.check(self.key[0], self.buffers[0])
        if refusal is not None:
            raise Refused(refusal)
        for buffer, value in zip(self.buffers[1:], delivered[1:], strict=True):
            if buffer.shape != value.shape:  # gloo would abort, or leave garbage in the tail
                raise AssertionError("a message reached a buffer of another size")
            buffer.copy_(value)


class _Done:
    def wait(self) -> None:
        pass


class FakeNetwork:
    """The shared state of ``world_size`` in-process workers."""

    def __init__(self, world_size: int, peer_timeout: float = 30.0):
        self.world_size, self.peer_timeout = world_size, peer_timeout
        self.changed = threading.Condition()
        self.mailbox: dict[tuple, Any] = {}
        self.swaps: dict[tuple[int, int, int], int] = {}  # (sender, receiver, channel) -> swaps
        self.meetings: dict[int, dict[int, Any]] = {}  # collective number -> rank -> value
        self.faults: list[Fault] = []
        self.dead: set[int] = set()  # ranks that stopped: they reach no rendezvous
        self.finished: set[int] = set()  # ranks whose function returned: they answer no more

    def endpoint(self, rank: int) -> "FakeComm":
        return FakeComm(self, rank)

    # ------------------------------------------------------------ point to point
    def send(self, sender: int, receiver: int, tensors: list[torch.Tensor],
             channel: int = 0) -> None:
        swap = self.swaps.get((sender, receiver, channel), 0)
        self.swaps[(sender, receiver, channel)] = swap + 1
        key = (sender, receiver, (channel, swap))
        payload: Any = [t.detach().clone() for t in tensors]
        for fault in self.faults:
            if not fault.applies(sender, receiver, swap):
                continue
            fault.hits += 1
            if fault.kind == "drop":
                return
            if fault.kind == "nan":
                payload = payload[:1] + [torch.full_like(t, float("nan")) for t in payload[1:]]
            elif fault.kind == "fail":
                payload = RuntimeError(f"Connection closed by peer {sender}")
            elif fault.kind == "delay":
                threading.Timer(fault.seconds, self._deliver, (key, payload)).start()
                return
        self._deliver(key, payload)

    def _deliver(self, key: tuple, payload: Any) -> None:
        with self.changed:
            self.mailbox[key] = payload
            self.changed.notify_all()

    def receive(self, sender: int, receiver: int, swap: int, buffers: list[torch.Tensor],
                check) -> _Work:
        return _Work(self, (sender, receiver, swap), buffers, check)

    # --------------------------------------------------------------- collectives
    def meet(self, number: int, rank: int, value: Any, timeout: float) -> list[Any]:
        """Everyone's ``value`` at the ``number``-th collective, in rank order."""
        deadline = time.monotonic() + timeout
        with self.changed:
            self.meetings.setdefault(number, {})[rank] = value
            self.changed.notify_all()
            while len(self.meetings[number]) < self.world_size:
                left = deadline - time.monotonic()
                missing = set(range(self.world_size)) - set(self.meetings[number])
                if left <= 0 or self.dead & missing:
                    raise PeerLostError(f"fake collective {number}: ranks {sorted(missing)} "
                                        "never came")
                self.changed.wait(left)
            return [self.meetings[number][r] for r in range(self.world_size)]


class FakeComm:
    """One worker's end of a ``FakeNetwork``: the ``Comm`` methods the engine calls."""

    group = None
    blocking_waits = False

    def __init__(self, network: FakeNetwork, rank: int):
        self.network, self.rank = network, rank
        self.world_size, self.peer_timeout = network.world_size, network.peer_timeout
        self.hosts = [f"thread{r}" for r in range(self.world_size)]
        self.run_id = "fake"
        self._collectives = 0
        self._receives: dict[tuple[int, int], int] = {}  # (peer, channel) -> swaps received

    @property
    def silence(self) -> str:
        return f"no answer within peer_timeout={self.peer_timeout:g} s"

    def staging_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")

    def beat(self) -> None:
        pass

    def roll_call(self) -> list[int]:
        return sorted(self.network.dead)

    # --------------------------------------------------------------- collectives
    def _meet(self, value: Any) -> list[Any]:
        self._collectives += 1
        return self.network.meet(self._collectives, self.rank, value, 10 * self.peer_timeout)

    def all_gather_json(self, value: Any) -> list[Any]:
        return [json.loads(v) for v in self._meet(json.dumps(value, sort_keys=True, default=repr))]

    @torch.no_grad()
    def broadcast_from_first_(self, tensors: list[torch.Tensor]) -> None:
        first = self._meet([t.clone() for t in tensors])[0]
        for tensor, value in zip(tensors, first):
            tensor.copy_(value)

    @torch.no_grad()
    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        everyone = self._meet([t.clone() for t in tensors])
        for k, tensor in enumerate(tensors):
            tensor.copy_(sum(values[k] for values in everyone))

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        self.all_reduce_sum_(tensors)
        for tensor in tensors:
            tensor.div_(self.world_size)

    def _posted(self, gather: Callable[[list[Any]], None], value: Any) -> Arrival:
        """A collective that meets in the background; ``gather`` writes the result."""
        self._collectives += 1
        number, network = self._collectives, self.network

        class Meeting:
            def wait(self_inner) -> None:
                gather(network.meet(number, self.rank, value, 10 * self.peer_timeout))

        arrival = Arrival(header_works=[Meeting()])
        arrival.started = time.perf_counter()
        arrival.wait_in_background(arrival.started, blocking=False)
        return arrival

    def post_all_reduce(self, tensors: list[torch.Tensor]) -> Arrival:
        def write(everyone: list[Any]) -> None:
            for k, tensor in enumerate(tensors):
                tensor.copy_(sum(values[k] for values in everyone))
        return self._posted(write, [t.clone() for t in tensors])

    def post_all_gather(self, pairs: list[tuple[list[torch.Tensor], torch.Tensor]]) -> Arrival:
        def write(everyone: list[Any]) -> None:
            for k, (outputs, _) in enumerate(pairs):
                for output, values in zip(outputs, everyone):
                    output.copy_(values[k])
        return self._posted(write, [t.clone() for _, t in pairs])

    def wait_collective(self, arrival: Arrival, what: str) -> None:
        if not arrival.join(arrival.started + 10 * self.peer_timeout):
            raise PeerLostError(f"GASLoC rank {self.rank}: {what} failed: "
                                f"{arrival.error or 'timeout'}")

    # ------------------------------------------------------------ point to point
    def post_swap(self, sends: dict[int, list[torch.Tensor]],
                  receives: dict[int, list[torch.Tensor]], check, channel: int = 0
                  ) -> PendingSwap:
        pending = PendingSwap(time.perf_counter())
        for peer, tensors in sends.items():
            receive_swap = self._receives.get((peer, channel), 0)
            self._receives[(peer, channel)] = receive_swap + 1
            self.network.send(self.rank, peer, tensors, channel)
            arrival = Arrival(header_works=[self.network.receive(
                peer, self.rank, (channel, receive_swap), receives[peer], check)])
            arrival.wait_in_background(pending.started, blocking=False)
            pending.arrivals[peer] = arrival
        return pending

    def wait_swap(self, pending: PendingSwap) -> tuple[dict[int, Arrival], dict[int, str]]:
        """Wait ``peer_timeout`` for each peer; past it, go on waiting while the peer still runs
        (it is late, not lost), up to 4 x ``peer_timeout``, as ``Comm`` does with its pings."""
        arrived, failed = {}, {}
        limit = pending.started + 4 * self.peer_timeout
        for peer, arrival in pending.arrivals.items():
            deadline = pending.started + self.peer_timeout
            while not arrival.join(deadline):
                if arrival.error or peer in self.network.finished or deadline >= limit:
                    failed[peer] = arrival.error or self.silence
                    break
                deadline = min(limit, time.perf_counter() + self.peer_timeout)
            else:
                arrived[peer] = arrival
        return arrived, failed


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, peer_timeout: float = 30.0,
                faults: list[Fault] | None = None, dead: tuple[int, ...] = (),
                timeout: float = 60.0) -> list[Any]:
    """``fn(rank, comm, *args)`` on ``world_size`` threads of one ``FakeNetwork``; ranks in
    ``dead`` are not run (they never answer). Returns each live rank's result (``None`` for
    the dead)."""
    network = FakeNetwork(world_size, peer_timeout)
    network.faults = list(faults or [])
    network.dead = set(dead)
    results: list[Any] = [None] * world_size
    errors: dict[int, str] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank, network.endpoint(rank), *args)
        except BaseException:  # noqa: BLE001 - reported to the caller
            errors[rank] = traceback.format_exc()
        network.finished.add(rank)

    threads = [threading.Thread(target=run, args=(r,), daemon=True)
               for r in range(world_size) if r not in dead]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    hung = [t for t in threads if t.is_alive()]
    if hung or errors:
        raise AssertionError(f"{len(hung)} workers still running after {timeout} s; errors:\n"
                             + "\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
    return results
