"""``GASLoCArguments``: the ``--gasloc_*`` flags for ``HfArgumentParser``.

Generated from ``GASLoCConfig``'s fields, so a new setting gets its flag (and its
``ACCELERATE_GASLOC_*`` variable) without being written twice.
"""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass
from typing import Optional

from ..config import GASLoCConfig
from .plugin import GASLoCPlugin

PREFIX = "gasloc_"


def _to_plugin(self) -> GASLoCPlugin:
    """The plugin these flags describe (unset flags fall back to env vars, then defaults)."""
    return GASLoCPlugin(**{f.name[len(PREFIX) :]: getattr(self, f.name) for f in fields(self)})


GASLoCArguments = make_dataclass(
    "GASLoCArguments",
    [
        (
            PREFIX + f.name,
            Optional[f.metadata["cli"]],
            field(default=None, metadata={"help": f.metadata["help"]}),
        )
        for f in fields(GASLoCConfig)
    ],
    namespace={"to_plugin": _to_plugin, "__module__": __name__},
)
GASLoCArguments.__doc__ = "GASLoC settings as ``--gasloc_<name>`` command-line flags."
