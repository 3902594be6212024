"""Which peers a worker has lost, and how that news spreads.

A peer is lost when it does not answer within ``peer_timeout`` or its connection
breaks. The worker that saw it goes on without it (as if it sat the round out)
and tells the peers it meets next: every round's header carries the sender's
lost flags, merged by union. Once a peer is known lost, nobody waits for it
again: an edge to it is dropped from the round's graph, its weight staying with
the worker.
"""

from __future__ import annotations

import logging

from ..errors import PeerLostError

logger = logging.getLogger(__name__)


class LostPeers:
    """This worker's view of which ranks are gone."""

    def __init__(self, rank: int, hosts: list[str]):
        self.rank, self.hosts = rank, hosts
        self.flags = [False] * len(hosts)
        self.when: dict[int, str] = {}  # rank -> when this worker learnt of it

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"

    def mark(self, rank: int, when: str, reason: str) -> None:
        """This worker itself found ``rank`` silent, unreachable or unfit ``when`` (e.g.
        ``"round 7"``), for ``reason``."""
        if not self.flags[rank]:
            self.flags[rank] = True
            self.when[rank] = when
            logger.warning("GASLoC %s: %s is lost in %s (%s); going on without it.",
                           self.describe(self.rank), self.describe(rank), when, reason)

    def merge(self, flags: list[bool], round_index: int) -> None:
        """Take a peer's news of lost ranks."""
        for rank, lost in enumerate(flags):
            if lost and not self.flags[rank] and rank != self.rank:
                self.flags[rank] = True
                self.when[rank] = f"round {round_index}, as a peer told"

    def as_floats(self) -> list[float]:
        return [float(f) for f in self.flags]

    def alive(self, peers: dict[int, float]) -> dict[int, float]:
        """The round's peers minus the lost ones (their weight stays with this worker)."""
        return {j: w for j, w in peers.items() if not self.flags[j]}

    @property
    def lost(self) -> list[int]:
        return [rank for rank, flag in enumerate(self.flags) if flag]

    def check_not_isolated(self) -> None:
        others = [r for r in range(len(self.flags)) if r != self.rank]
        if others and all(self.flags[r] for r in others):
            raise PeerLostError(
                f"GASLoC {self.describe(self.rank)}: every other worker is lost ("
                + ", ".join(f"{self.describe(r)} in {self.when[r]}" for r in others)
                + "); this worker cannot gossip any more. Restart the job with the workers "
                "that are alive (docs/guide/reliability.md)."
            )

    def call_roll(self, comm, when: str) -> list[int]:
        """Roll call (collective): ranks that do not answer within ``peer_timeout`` become lost;
        returns every lost rank. For the moments where the caller is about to run collectives
        of its own (Trainer's logging, evaluation, checkpoints), which have no deadline."""
        for rank in comm.roll_call():
            self.mark(rank, when, comm.silence)
        return self.lost

    def state_dict(self) -> dict:
        return {"flags": list(self.flags), "when": dict(self.when)}

    def load_state_dict(self, state: dict) -> None:
        self.flags, self.when = list(state["flags"]), dict(state["when"])

