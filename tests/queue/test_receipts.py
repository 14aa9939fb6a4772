"""Receipts: only well-formed JetStream ACK subjects parse; everything else is refused."""

from __future__ import annotations

import pytest

from trapline.errors import ReceiptError
from trapline.queue import parse_receipt
from trapline.queue.naming import QueueNames


def test_a_v1_ack_subject_parses_into_its_delivery_fields() -> None:
    r = parse_receipt("$JS.ACK.trapline-ab12cd34-7-g1.workers.2.15.31.1795917281262622217.3")
    assert (r.stream, r.consumer, r.delivered, r.stream_seq, r.consumer_seq) == (
        "trapline-ab12cd34-7-g1",
        "workers",
        2,
        15,
        31,
    )


def test_a_v2_ack_subject_with_domain_and_account_parses() -> None:
    r = parse_receipt("$JS.ACK.hub.ACCHASH.trapline-ab12cd34-7-g1.workers.1.4.4.1795917281.0.xyz")
    assert (r.stream, r.delivered, r.stream_seq) == ("trapline-ab12cd34-7-g1", 1, 4)


@pytest.mark.parametrize(
    "subject",
    [
        None,
        42,
        "",
        "$JS.ACK.>",
        "$JS.ACK.s.c.1.2",
        "$JS.ACK.s.c.x.2.3.4.5",
        "$JS.ACK.s.c.0.2.3.4.5",
        "$JS.API.STREAM.DELETE.trapline-x-1-g1",
        "$JS.ACK.s.c.1.2.3.4.5 extra",
        "$JS.ACK.s.*.1.2.3.4.5",
        "$JS.ACK." + "a" * 600 + ".c.1.2.3.4.5",
    ],
)
def test_anything_else_is_refused(subject: object) -> None:
    with pytest.raises(ReceiptError):
        parse_receipt(subject)


def test_stream_names_belong_to_one_installation_and_job() -> None:
    names = QueueNames("ab12cd34")
    assert names.parse_stream(names.stream(7, 3)) == (7, 3)
    assert QueueNames("ffffffff").parse_stream(names.stream(7, 3)) is None
    assert names.parse_stream("trapline-ab12cd34-7-g3x") is None
