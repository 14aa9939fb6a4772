"""Receipts: JetStream reply subjects handed to workers, parsed and checked.

A worker proves it holds a task by echoing the task's ``reply_subject``. The
server publishes to such a subject only after checking that it names the
job's own stream and consumer; anything else could ACK another job's work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trapline.errors import ReceiptError

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_RECEIPT_LEN = 512


@dataclass(frozen=True)
class Receipt:
    """The parts of a ``$JS.ACK`` reply subject that identify one delivery of one message."""

    subject: str
    stream: str
    consumer: str
    delivered: int
    stream_seq: int
    consumer_seq: int


def parse_receipt(subject: object) -> Receipt:
    """Parse a JetStream ACK reply subject (v1: 9 tokens, v2 with domain: 12 tokens)."""
    if not isinstance(subject, str) or not subject:
        raise ReceiptError("reply_subject must be a non-empty string")
    if len(subject) > MAX_RECEIPT_LEN:
        raise ReceiptError("reply_subject is too long")
    tokens = subject.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ReceiptError("reply_subject is not a JetStream receipt")
    if not all(_TOKEN.match(t) for t in tokens[2:]):
        raise ReceiptError("reply_subject has invalid characters")
    if len(tokens) == 9:
        stream, consumer, delivered, sseq, cseq = tokens[2:7]
    elif len(tokens) >= 12:
        stream, consumer, delivered, sseq, cseq = tokens[4:9]
    else:
        raise ReceiptError("reply_subject is not a JetStream receipt")
    try:
        numbers = int(delivered), int(sseq), int(cseq)
    except ValueError as exc:
        raise ReceiptError("reply_subject has non-numeric sequence fields") from exc
    if min(numbers) < 1:
        raise ReceiptError("reply_subject has invalid sequence fields")
    return Receipt(subject, stream, consumer, *numbers)
