"""Reading a job's own log lines the way an operator would."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The line the server writes for each result POST it committed.
_RESULT_LINE = re.compile(r"results from .*: (\d+) accepted, (\d+) duplicate, (\d+) rejected")


def totals_of_result_lines(logs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Sums of the server's per-POST result lines: accepted, duplicate, rejected, posts."""
    totals = {"accepted": 0, "duplicate": 0, "rejected": 0, "posts": 0}
    for line in logs:
        m = _RESULT_LINE.search(line["message"])
        if m:
            totals["posts"] += 1
            totals["accepted"] += int(m.group(1))
            totals["duplicate"] += int(m.group(2))
            totals["rejected"] += int(m.group(3))
    return totals
