"""Embeddings out on MQTT: the wire format, an asyncio publisher, a subscriber helper, brokers.

The contract (topics, bytes, QoS, sequence semantics) is docs/mqtt.md.
"""

from .broker import EmbeddedBroker, Mosquitto
from .connection import BrokerUnavailable, TLSOptions, parse_broker_url
from .message import EmbeddingMessage, Gap, Status
from .publisher import Publisher, PublisherCounters
from .subscriber import SubscriberStats, subscribe
from .wire import WireError, decode, decode_json, decode_status, encode, encode_json, encode_status

__all__ = [
    "BrokerUnavailable", "EmbeddedBroker", "EmbeddingMessage", "Gap", "Mosquitto", "Publisher",
    "PublisherCounters", "Status", "SubscriberStats", "TLSOptions", "WireError", "decode", "decode_json",
    "decode_status", "encode", "encode_json", "encode_status", "parse_broker_url", "subscribe",
]
