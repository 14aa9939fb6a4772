"""Names of a job's JetStream resources.

Layout: one stream per job (``trapline-<installation>-<job id>-g<generation>``)
with a single subject and one durable pull consumer (``workers``). Why a
stream per job and not one work stream with per-job subjects:

- the stream name is part of every receipt, so checking that a reply subject
  belongs to a job is a string comparison, with no lookup;
- finalizing or cancelling a job is one ``delete_stream`` that removes its
  messages and consumer together, and a zombie is any stream whose job is
  finished;
- the generation suffix changes whenever the queue is rebuilt from the ledger
  (NATS store lost, retry after finish), so receipts from an earlier
  incarnation can never be mistaken for deliveries of the new one.

The installation id (random, stored in the database) keeps two trapline
databases that share one NATS from ever touching each other's streams. The
cost is one stream per running job; finished jobs hold none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONSUMER = "workers"


@dataclass(frozen=True)
class QueueNames:
    installation: str

    def stream(self, job_id: int, generation: int) -> str:
        return f"trapline-{self.installation}-{job_id}-g{generation}"

    def subject(self, job_id: int, generation: int) -> str:
        return f"trapline.{self.installation}.jobs.{job_id}.g{generation}"

    def parse_stream(self, name: str) -> tuple[int, int] | None:
        """(job id, generation) of one of this installation's streams, or None."""
        m = re.fullmatch(rf"trapline-{re.escape(self.installation)}-(\d+)-g(\d+)", name)
        return (int(m.group(1)), int(m.group(2))) if m else None
