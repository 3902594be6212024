"""What travels: the round's header, the wire format of the proposals (native dtype, or a codec
with error feedback), how what arrives is mixed in, and the exchange that moves it and counts
its bytes."""

from .encoded import CodecWire, make_wire
from .exchange import Arrived, ExchangeStats, GossipExchange, InTransit
from .header import Header
from .native import NativeWire

Wire = NativeWire | CodecWire

__all__ = ["Arrived", "CodecWire", "ExchangeStats", "GossipExchange", "Header", "InTransit",
           "NativeWire", "Wire", "make_wire"]
