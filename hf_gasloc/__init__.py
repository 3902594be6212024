"""hf_gasloc: GASLoC decentralized pretraining for Hugging Face Trainer and Accelerate."""

from .arguments import GASLoCArguments
from .config import GASLoCConfig
from .engine import GASLoC
from .plugin import GASLoCPlugin
from .topology import RoundGraph, Topology, build_topology

__version__ = "0.1.0"

__all__ = [
    "GASLoC",
    "GASLoCArguments",
    "GASLoCConfig",
    "GASLoCPlugin",
    "RoundGraph",
    "Topology",
    "build_topology",
]
