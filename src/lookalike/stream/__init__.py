"""Real-time ingest from a message broker (NATS JetStream): consumer, publisher, wire format.

See :mod:`lookalike.stream.jetstream` for the delivery semantics and
:mod:`lookalike.stream.messages` for the message format.
"""

from .messages import BadMessageError, Event, make_headers, parse_message

__all__ = ["BadMessageError", "Event", "make_headers", "parse_message"]
