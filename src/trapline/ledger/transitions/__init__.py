"""The ledger's write side: every state change of an image or a job, as set-based
statements per batch.

Each transition runs in the caller's transaction and guards every UPDATE on the state
it expects (``state IN ImageState.OPEN``, the delivery a receipt names, a job still
``STARTED``), so replays and concurrent callers (other requests, other replicas) change
a row at most once: what ``UPDATE … RETURNING`` hands back is exactly what changed, and
only that is reported, written to the history (one multi-row INSERT per transition,
:class:`~trapline.ledger.events.Journal`) and returned to the caller.

Nothing here touches the queue or the server's metrics: the caller commits, then acts
on the queue (ledger first, queue second) and counts from the returned outcome.
"""

from trapline.ledger.transitions.common import Holder, holder_label
from trapline.ledger.transitions.jobs import (
    Finalized,
    compact_counts,
    conclude,
    fail_open,
    final_status,
    finalize,
    reevaluate,
    revoke,
)
from trapline.ledger.transitions.leases import (
    Expired,
    HeldLease,
    Lapsed,
    Leased,
    Leasing,
    Offer,
    expire_leases,
    extend,
    lease,
    release,
)
from trapline.ledger.transitions.results import Recorded, Result, record_results

__all__ = [
    "Expired",
    "Finalized",
    "HeldLease",
    "Holder",
    "Lapsed",
    "Leased",
    "Leasing",
    "Offer",
    "Recorded",
    "Result",
    "compact_counts",
    "conclude",
    "expire_leases",
    "extend",
    "fail_open",
    "final_status",
    "finalize",
    "holder_label",
    "lease",
    "record_results",
    "reevaluate",
    "release",
    "revoke",
]
