"""hf_gasloc: GASLoC decentralized pretraining for Hugging Face Trainer and Accelerate."""

from .arguments import GASLoCArguments
from .config import GASLoCConfig
from .engine import GASLoC
from .plugin import GASLoCPlugin
from .topology import RoundGraph, Topology, build_topology
from .trainer import GASLoCCallback

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
