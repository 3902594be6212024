"""The errors GASLoC raises when a fault cannot be contained on this worker."""

from __future__ import annotations


class PeerLostError(RuntimeError):
    """A peer stopped answering and this run cannot go on without it (or no peer is left)."""


class NonFiniteError(RuntimeError):
    """This worker's parameters keep turning non-finite, or no finite worker is left."""


class CheckpointError(ValueError):
    """A GASLoC checkpoint is missing, truncated, or belongs to another run."""


class RunMismatchError(ValueError):
    """Ranks, or a run and the checkpoint it resumes from, disagree on what makes them one run."""
