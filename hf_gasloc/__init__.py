"""hf_gasloc: GASLoC decentralized pretraining for Hugging Face Trainer and Accelerate."""

from .integrations.arguments import GASLoCArguments
from .config import GASLoCConfig
from .engine import GASLoC
from .integrations.plugin import GASLoCPlugin
from .schedule.topology import RoundGraph, Topology, build_topology
from .integrations.trainer import GASLoCCallback

__version__ = "0.1.0"

__all__ = [
    "GASLoC",
    "GASLoCArguments",
    "GASLoCCallback",
    "GASLoCConfig",
    "GASLoCPlugin",
    "RoundGraph",
    "Topology",
    "build_topology",
]
