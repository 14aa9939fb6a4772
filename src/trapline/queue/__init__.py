"""The task queue: NATS JetStream streams, consumers and receipts."""

from trapline.queue.embedded import EmbeddedNats
from trapline.queue.jetstream import ConsumerStats, Delivery, TaskQueue
from trapline.queue.receipts import Receipt, parse_receipt

__all__ = ["ConsumerStats", "Delivery", "EmbeddedNats", "Receipt", "TaskQueue", "parse_receipt"]
