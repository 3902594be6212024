"""Who reaches whom: the only package that calls ``torch.distributed``.

``Comm`` is one worker's view of its process group: rank, world size, hosts,
the start-up exchanges, the complete graph's collectives, the gossip's
point-to-point swaps with deadlines (``point_to_point.py``, ``waiting.py``),
the liveness pings that tell a late peer from a lost one (``liveness.py``), and
the lost peers this worker knows of (``membership.py``), and the process groups
of a worker of several processes (``worker_groups.py``).
"""

from .comm import Comm, gather_json
from .membership import LostPeers
from .waiting import Arrival, PendingSwap
from .worker_groups import WorkerGroups

__all__ = ["Arrival", "Comm", "LostPeers", "PendingSwap", "WorkerGroups", "gather_json"]
