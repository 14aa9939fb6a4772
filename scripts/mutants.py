"""Reopen each seed window (and each architecture guarantee) in a scratch copy; see its test fail.

Every row of :data:`MUTANTS` names what it protects (a row of
``docs/seed-windows.md``, or a guarantee of ``docs/architecture.md``), a file
under ``src/``, an exact ``old`` snippet and the ``new`` text that reopens the
window, and the test node ids that must catch it. For each row the script
copies the repository once into a scratch directory (without ``.git`` and
``.venv``), applies that one mutation, runs the named tests with this
interpreter's pytest (``-x``, bounded by ``--timeout-s``), and restores the file.

Verdicts: ``killed`` (a test failed), ``SURVIVED`` (every test passed: the row
is not closed), ``DID-NOT-APPLY`` (``old`` not found exactly once: the table is
stale), ``ERROR`` (pytest could not run the tests: a node id that does not
exist, a collection error) and ``TIMEOUT``. The exit code is 0 only when every
selected mutant was killed.

The project is installed editable from the main checkout, so the scratch copy's
``src`` and root are put first on ``PYTHONPATH``; before anything runs, the
script checks that ``trapline`` imports from the scratch copy both here and in
a child started with the environment the tests give their subprocesses.

Usage::

    python scripts/mutants.py --list
    python scripts/mutants.py                    # every row; baseline first
    python scripts/mutants.py --only W11 --only G3   # W11 selects W11a, W11b, ...
    python scripts/mutants.py --only W13a -k sqlite  # extra pytest selection
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = (".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache")


@dataclass(frozen=True)
class Mutant:
    id: str
    protects: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


CHAOS_FAULTS = "tests/chaos/test_worker_faults.py"
CHAOS_RESULTS = "tests/chaos/test_result_endpoint.py"
RUNNER = "tests/worker/test_runner.py"
DELIVERY = "tests/worker/test_delivery.py"
WORKER_API = "tests/server/test_worker_api.py"
LEASES = "tests/server/test_leases.py"
RECONCILIATION = (
    "tests/test_reconciliation.py::"
    "test_a_batch_reserved_by_a_client_that_never_answers_is_redelivered_and_processed"
)
KILLED_SERVER = (
    "tests/chaos/test_server_killed_between_commit_and_ack.py::"
    "test_a_server_killed_between_commit_and_ack_never_hands_the_image_out_again"
)

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "W1a",
        "window 1: worker ends (SIGTERM)",
        "a stopping worker keeps its unprocessed tasks instead of releasing them",
        "src/trapline/worker/runner.py",
        """        await self._releaser.release(
            self.held.in_states(TaskState.RESERVED, TaskState.DOWNLOADING, TaskState.WAITING),
            "shutting down",
        )""",
        "        pass  # mutant: nothing released at shutdown",
        (
            f"{CHAOS_FAULTS}::test_worker_sigtermed_mid_job_releases_its_unprocessed_tasks_to_another_within_2s",
            "tests/worker/test_cli.py::test_sigterm_delivers_or_releases_everything_and_exits_0",
        ),
    ),
    Mutant(
        "W1b",
        "window 1: worker ends (SIGKILL)",
        "the queue's lease is 100x the ledger's: a killed worker's tasks come back too late",
        "src/trapline/queue/jetstream.py",
        "                ack_wait=self.ack_wait_s,",
        "                ack_wait=self.ack_wait_s * 100,",
        (
            f"{CHAOS_FAULTS}::test_worker_sigkilled_mid_batch_while_another_runs_is_redelivered_within_ack_wait_plus_5s",
        ),
    ),
    Mutant(
        "W2a",
        "window 2: result POST fails once (5xx)",
        "a 5xx is taken as a refusal instead of retried",
        "src/trapline/worker/delivery.py",
        "                if not (status in RETRYABLE_STATUSES or status >= 500):",
        "                if True:  # mutant: every non-2xx is final",
        (
            f"{CHAOS_RESULTS}::test_result_endpoint_503_on_30pc_and_reset_after_commit_on_10pc_counts_each_image_once",
            f"{DELIVERY}::test_transient_failures_are_retried_with_the_same_body",
        ),
    ),
    Mutant(
        "W2b",
        "window 2: result POST fails once (413)",
        "a 413 is not split",
        "src/trapline/worker/delivery.py",
        "                if status == 413:",
        "                if status == -413:",
        (f"{DELIVERY}::test_413_splits_the_batch_until_it_fits",),
    ),
    Mutant(
        "W2c",
        "window 2: result POST fails once (reset after commit)",
        "a replayed success is stored again (the success UPDATE ignores the image's state)",
        "src/trapline/ledger/transitions/results.py",
        "            session, job_id, successes, ImageState.OPEN, _done_values(now), IMAGES.c.id\n",
        "            session, job_id, successes, tuple(ImageState), _done_values(now), IMAGES.c.id\n",
        (
            f"{CHAOS_RESULTS}::test_result_endpoint_503_on_30pc_and_reset_after_commit_on_10pc_counts_each_image_once",
            f"{WORKER_API}::test_the_same_result_body_posted_three_times_is_counted_once",
        ),
    ),
    Mutant(
        "W3a",
        "window 3: slow POSTs",
        "the delivery deadline is ignored (x1000)",
        "src/trapline/worker/delivery.py",
        "            deadline = time.monotonic() + self.deadline_s",
        "            deadline = time.monotonic() + self.deadline_s * 1000",
        (f"{DELIVERY}::test_a_hanging_post_is_cut_off_by_the_deadline",),
    ),
    Mutant(
        "W3b",
        "window 3: the last batch's POST during an outage",
        "retry backoff is not capped, so delivery resumes long after the server is back",
        "src/trapline/worker/delivery.py",
        "    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))",
        "    ceiling = base_s * (2 ** min(attempt, 30))",
        (
            f"{CHAOS_RESULTS}::test_result_endpoint_down_20s_while_the_last_batches_post_finishes_on_their_first_retry_after",
            f"{DELIVERY}::test_delivery_resumes_soon_after_the_server_returns",
        ),
    ),
    Mutant(
        "W3c",
        "window 3: results waiting in the outbox keep their leases",
        "the worker stops extending the leases of tasks whose results wait to be delivered",
        "src/trapline/worker/leases.py",
        "            if task.extendable:",
        "            if False:  # mutant: no extension while the result waits",
        (
            f"{CHAOS_RESULTS}::test_result_endpoint_down_20s_while_the_last_batches_post_finishes_on_their_first_retry_after",
        ),
    ),
    Mutant(
        "W4",
        "window 4: prefetched tasks outlive their lease",
        "the worker never extends its leases",
        "src/trapline/worker/runner.py",
        "                if self._caps.lease_extension and self._caps.ack_wait_s:",
        "                if False:  # mutant: no lease extension",
        (
            f"{CHAOS_FAULTS}::test_compute_slower_than_ack_wait_delivers_no_image_twice",
            f"{RUNNER}::test_leases_are_extended_while_a_batch_computes_past_its_lease",
        ),
    ),
    Mutant(
        "W5a",
        "window 5: exception outside the per-batch handler (malformed result)",
        "a result that cannot be converted raises out of the compute stage",
        "src/trapline/worker/compute.py",
        "        except Exception as exc:  # a malformed result fails its image, never the batch",
        "        except KeyError as exc:  # mutant",
        (f"{RUNNER}::test_a_pipeline_breaking_its_contract_fails_images_not_the_worker",),
    ),
    Mutant(
        "W5b",
        "window 5: exception outside the per-batch handler (pipeline raises)",
        "a raising pipeline's exception escapes instead of failing images one by one",
        "src/trapline/worker/compute_stage.py",
        "                results = await self._compute_one_by_one(batch, slug, inputs)",
        "                raise",
        (f"{RUNNER}::test_a_pipeline_that_keeps_raising_reports_failures_then_stops",),
    ),
    Mutant(
        "W6",
        "window 6: model load fails after the first reserve",
        "pipelines are not loaded before serving (the load failure comes after reserving)",
        "src/trapline/worker/__init__.py",
        "            pipeline.load()\n",
        "            pass  # mutant: loaded lazily, at first use\n",
        (f"{RUNNER}::test_pipeline_that_cannot_load_reserves_nothing",),
    ),
    Mutant(
        "W7",
        "window 7: reserve response lost",
        "the queue's lease is 100x the ledger's: a lost batch is not redelivered in time",
        "src/trapline/queue/jetstream.py",
        "                ack_wait=self.ack_wait_s,",
        "                ack_wait=self.ack_wait_s * 100,",
        (RECONCILIATION,),
    ),
    Mutant(
        "W8",
        "window 8: one malformed task aborts the job loop",
        "a task without an image_url raises instead of becoming an error result",
        "src/trapline/worker/tasks.py",
        '            problems.append(f"image_url is {_type_name(image_url)}, not a URL")',
        '            raise ValueError(f"image_url is {_type_name(image_url)}, not a URL")',
        (f"{RUNNER}::test_malformed_tasks_become_error_results_and_the_loop_goes_on",),
    ),
    Mutant(
        "W9a",
        "window 9: one GPU child dies",
        "a child that dies is not restarted",
        "src/trapline/worker/supervisor.py",
        "            if self._signals or code == 0 or code == EXIT_CANNOT_START or not self._restart:",
        "            if True:  # mutant: never restart",
        ("tests/worker/test_cli.py::test_a_killed_process_is_restarted_while_its_sibling_goes_on",),
    ),
    Mutant(
        "W9b",
        "window 9: siblings torn down",
        "a child's death stops its siblings too",
        "src/trapline/worker/supervisor.py",
        "            ran = now - child.started_at\n",
        "            self._forward()  # mutant: tear the siblings down\n"
        "            ran = now - child.started_at\n",
        ("tests/worker/test_cli.py::test_a_killed_process_is_restarted_while_its_sibling_goes_on",),
    ),
    Mutant(
        "W10",
        "window 10: one invalid item -> 400 for the whole batch",
        "any invalid item rejects the whole POST",
        "src/trapline/server/ingest.py",
        "    checked = [check_item(i, item) for i, item in enumerate(raw_items)]\n",
        "    checked = [check_item(i, item) for i, item in enumerate(raw_items)]\n"
        "    if any(c.rejected for c in checked):\n"
        "        from trapline.errors import InvalidRequest\n"
        "\n"
        '        raise InvalidRequest("mutant: one invalid item rejects the batch")\n',
        (f"{WORKER_API}::test_one_bad_item_is_rejected_while_the_others_of_its_post_are_applied",),
    ),
    Mutant(
        "W11a",
        "window 11: commit without ACK",
        "the reserve path hands out a message whose image already has an outcome",
        "src/trapline/ledger/transitions/leases.py",
        "            IMAGES.c.state.in_(ImageState.OPEN),  # an image with an outcome is never leased\n",
        "",
        (
            f"{LEASES}::test_a_result_committed_but_never_acked_is_settled_when_its_message_returns",
            KILLED_SERVER,
        ),
    ),
    Mutant(
        "W11b",
        "window 11: exception while saving (ACK only after commit)",
        "results are ACKed before the transaction that stores them",
        "src/trapline/server/ingest.py",
        "    now = utcnow()\n",
        "    now = utcnow()\n    await ctx.queue.ack(to_ack)  # mutant: ACK before commit\n",
        ("tests/server/test_database_outage.py", KILLED_SERVER),
    ),
    Mutant(
        "W11c",
        "window 11: deliveries that never reached a worker (retry budget is the ledger's)",
        "JetStream enforces a delivery limit of its own",
        "src/trapline/queue/jetstream.py",
        "                max_deliver=-1,",
        "                max_deliver=3,",
        (f"{LEASES}::test_deliveries_that_never_reached_a_worker_do_not_strand_the_image",),
    ),
    Mutant(
        "W12a",
        "window 12: success naming no image",
        "a success without a source image is not refused (it crashes the POST)",
        "src/trapline/server/results.py",
        "    if len(success.source_images) != 1:",
        "    if len(success.source_images) > 1:",
        (f"{WORKER_API}::test_one_bad_item_is_rejected_while_the_others_of_its_post_are_applied",),
    ),
    Mutant(
        "W12b",
        "window 12: error result with a null image id",
        "a null image id is not refused by validation",
        "src/trapline/server/results.py",
        "        elif image_id is None or (isinstance(image_id, str) and not image_id.strip()):",
        "        elif isinstance(image_id, str) and not image_id.strip():",
        (f"{WORKER_API}::test_one_bad_item_is_rejected_while_the_others_of_its_post_are_applied",),
    ),
    Mutant(
        "W13a",
        "window 13: results after the health check failed the image",
        "a late success does not upgrade a failed image",
        "src/trapline/ledger/transitions/results.py",
        "    if rest:\n",
        "    if False:  # mutant: no failed->done upgrade\n",
        (
            f"{WORKER_API}::test_a_late_success_upgrades_a_failed_image_and_re_evaluates_a_finished_job",
        ),
    ),
    Mutant(
        "W13b",
        "window 13: results after the job ended",
        "a finished job's status is not re-evaluated after a late result",
        "src/trapline/ledger/transitions/jobs.py",
        "        await reevaluate(session, job_id, now=now)\n",
        "        pass  # mutant: no re-evaluation\n",
        (
            f"{WORKER_API}::test_a_late_success_upgrades_a_failed_image_and_re_evaluates_a_finished_job",
        ),
    ),
    Mutant(
        "W13c",
        "window 13: results with a stale receipt",
        "a result whose receipt is not the current delivery is not accepted",
        "src/trapline/ledger/transitions/results.py",
        "            or_(*named),\n",
        "            or_(*named),\n"
        "            IMAGES.c.receipt.in_([r.receipt for r in items]),  # mutant: current delivery only\n",
        (
            f"{WORKER_API}::test_a_result_with_a_stale_receipt_is_committed_and_the_later_one_is_a_duplicate",
        ),
    ),
    Mutant(
        "W14",
        "window 14: a job merely queued is failed by a health check",
        "every running job without a deadline is failed at the next sweep",
        "src/trapline/server/reconciler.py",
        "                        Job.deadline_at.is_not(None),\n"
        "                        Job.deadline_at < now,\n",
        "                        Job.deadline_at.is_(None) | (Job.deadline_at < now),\n",
        (
            "tests/server/test_waiting.py::test_a_job_nobody_pulls_waits_saying_why_and_completes_when_a_worker_starts_later",
        ),
    ),
    Mutant(
        "W15",
        "window 15: per-job queue state lost",
        "a running job whose stream vanished is not re-queued from the ledger",
        "src/trapline/server/reconciler.py",
        "            elif (job.id, job.queue_generation) in streams:\n",
        "            else:  # mutant: never re-queue a running job\n",
        (
            "tests/server/test_recovery.py::test_nats_store_wiped_mid_job_is_requeued_from_the_ledger_and_completes",
        ),
    ),
    Mutant(
        "G1",
        "guarantee: replays change nothing (one outcome per image)",
        "an error result downgrades a done image",
        "src/trapline/ledger/transitions/results.py",
        "            errors,\n            ImageState.OPEN,\n",
        "            errors,\n            (*ImageState.OPEN, ImageState.DONE),\n",
        (
            f"{WORKER_API}::test_an_error_result_fails_the_image_with_its_reason_and_never_downgrades_a_done_one",
        ),
    ),
    Mutant(
        "G2",
        "guarantee: only committed outcomes are ACKed (per-item status)",
        "rejected items' receipts are ACKed too",
        "src/trapline/server/ingest.py",
        "    acks = [s for s in to_ack if s in settled]",
        "    acks = list(to_ack)",
        (f"{WORKER_API}::test_one_bad_item_is_rejected_while_the_others_of_its_post_are_applied",),
    ),
    Mutant(
        "G3",
        "guarantee: receipts are checked (job, consumer)",
        "a receipt of another job is accepted",
        "src/trapline/server/dispatch.py",
        "    if parsed is None or parsed[0] != job.id or receipt.consumer != naming.CONSUMER:",
        "    if parsed is None:",
        (
            f"{WORKER_API}::test_a_receipt_of_another_job_or_an_arbitrary_subject_is_rejected_and_not_acked",
        ),
    ),
    Mutant(
        "G4",
        "guarantee: extend/release act only on the current delivery",
        "a stale receipt may extend or release the current delivery",
        "src/trapline/ledger/transitions/leases.py",
        "        tuple_(IMAGES.c.msg_seq, IMAGES.c.deliveries).in_(held),\n",
        "        IMAGES.c.msg_seq.in_([seq for seq, _ in held]),  # mutant: any delivery\n",
        (f"{WORKER_API}::test_extend_or_release_with_a_stale_receipt_is_refused",),
    ),
    Mutant(
        "G5",
        "guarantee: retry budget (TRAPLINE_MAX_DELIVER leases)",
        "one lease more than the budget is handed out",
        "src/trapline/ledger/transitions/leases.py",
        "    last = {h.id for h in held if h.leases >= max_deliver}",
        "    last = {h.id for h in held if h.leases > max_deliver}",
        (
            f"{LEASES}::test_a_batch_dropped_on_every_delivery_is_failed_with_its_reason_soon_after_the_last_lease",
        ),
    ),
    Mutant(
        "G6",
        "guarantee: the last lapse fails the image whether or not anybody pulls",
        "the reconciler never lapses a lease (only a pull would)",
        "src/trapline/ledger/transitions/leases.py",
        "        .where(IMAGES.c.state == ImageState.RESERVED, IMAGES.c.lease_deadline < now)",
        "        .where(IMAGES.c.state == ImageState.RESERVED, IMAGES.c.lease_deadline < now - timedelta(days=1))",
        (
            f"{LEASES}::test_a_batch_dropped_on_every_delivery_is_failed_with_its_reason_soon_after_the_last_lease",
        ),
    ),
    Mutant(
        "G7",
        "guarantee: a lapsed lease is a WARNING naming the images",
        "a lease lapse is logged below WARNING",
        "src/trapline/ledger/transitions/leases.py",
        '            f"{batch[0].leases} of {max_deliver}); will be redelivered:",\n'
        "            level=logging.WARNING,",
        '            f"{batch[0].leases} of {max_deliver}); will be redelivered:",\n'
        "            level=logging.DEBUG,",
        (
            f"{LEASES}::test_a_batch_dropped_on_every_delivery_is_failed_with_its_reason_soon_after_the_last_lease",
        ),
    ),
    Mutant(
        "G8",
        "guarantee: the job is finalized by whoever commits the last outcome",
        "the last result does not finalize the job (only a later sweep would)",
        "src/trapline/server/ingest.py",
        "        if recorded.changed:\n            finalized = await transitions.conclude(",
        "        if False:  # mutant\n            finalized = await transitions.conclude(",
        (
            f"{WORKER_API}::test_a_job_runs_end_to_end_and_finishes_the_moment_its_last_result_commits",
        ),
    ),
    Mutant(
        "G9",
        "guarantee: full history per image",
        "an accepted result is not written to the image's history",
        "src/trapline/ledger/transitions/results.py",
        '    journal.history(job_id, [(i, f"result accepted from {who}") for i in out.done])',
        "    journal.history(job_id, [])",
        (RECONCILIATION,),
    ),
    Mutant(
        "G10",
        "guarantee: a late success keeps the failure in the history",
        "the upgrade of a failed image is not recorded",
        "src/trapline/ledger/transitions/results.py",
        "    for image_id, was in out.upgraded:\n",
        "    for image_id, was in []:  # mutant\n",
        (
            f"{WORKER_API}::test_a_late_success_upgrades_a_failed_image_and_re_evaluates_a_finished_job",
        ),
    ),
    Mutant(
        "G11",
        "guarantee: only an explicit per-job deadline fails what remains",
        "the deadline is never applied",
        "src/trapline/server/reconciler.py",
        "                        Job.deadline_at < now,\n",
        "                        Job.deadline_at < now - timedelta(days=1),\n",
        (
            "tests/server/test_waiting.py::test_an_explicit_deadline_fails_what_remains_with_its_reason",
        ),
    ),
    Mutant(
        "G12",
        "guarantee: streams of finished jobs are deleted",
        "finalizing a job leaves its stream",
        "src/trapline/server/lifecycle.py",
        "    await _delete_queue_quietly(ctx, job_id, finalized.generation)\n"
        "    return finalized.status\n",
        "    return finalized.status\n",
        (
            f"{WORKER_API}::test_a_job_runs_end_to_end_and_finishes_the_moment_its_last_result_commits",
        ),
    ),
)


def _selects(wanted: str, mutant_id: str) -> bool:
    """``W11`` selects W11a, W11b, ...; ``G`` every G row; anything else only itself."""
    w, m = wanted.upper(), mutant_id.upper()
    if m == w:
        return True
    if not m.startswith(w):
        return False
    rest = m[len(w) :]
    return rest.isalpha() if w[-1].isdigit() else rest[0].isdigit()


def select_mutants(only: Sequence[str]) -> list[Mutant]:
    """Rows selected by the ``--only`` values (comma-separated allowed); all when none."""
    if not only:
        return list(MUTANTS)
    wanted = [w.strip() for item in only for w in item.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(_selects(w, m.id) for m in MUTANTS)]
    if unknown:
        raise SystemExit(f"no mutant with id {', '.join(unknown)}; see --list")
    return [m for m in MUTANTS if any(_selects(w, m.id) for w in wanted)]


def copy_repo(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)


def scratch_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(scratch / "src"), str(scratch), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


_CHECK_IMPORTS = """
import subprocess, sys
import trapline
from tests.support import processes
print(trapline.__file__)
print(processes.REPO_ROOT)
child = subprocess.run(
    [sys.executable, "-c", "import trapline; print(trapline.__file__)"],
    env=processes.child_env(), capture_output=True, text=True, check=True,
)
print(child.stdout.strip())
"""


def check_imports(scratch: Path, env: dict[str, str]) -> None:
    """``trapline`` and ``tests`` come from the scratch copy, here and in test subprocesses."""
    out = subprocess.run(
        [sys.executable, "-c", _CHECK_IMPORTS],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise SystemExit(f"cannot check imports in the scratch copy:\n{out.stderr}")
    lines = out.stdout.split()
    root = scratch.resolve()
    wrong = [p for p in lines if not Path(p).resolve().is_relative_to(root)]
    if len(lines) != 3 or wrong:
        raise SystemExit(f"imports do not resolve into {root}: {lines}")


@dataclass
class Verdict:
    mutant: Mutant
    outcome: str
    seconds: float
    detail: str = ""


def run_pytest(
    scratch: Path, env: dict[str, str], tests: Sequence[str], extra: Sequence[str], timeout_s: float
) -> tuple[int | None, str]:
    """Exit code of pytest on ``tests`` (None on timeout) and the tail of its output."""
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests, *extra]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            # pytest and what it started in its session: TERM lets fixtures clean up.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-15:]
    return code, "\n".join(tail)


def apply(source: str, mutant: Mutant) -> str | None:
    """The mutated text, or None when ``old`` is not in ``source`` exactly once."""
    if source.count(mutant.old) != 1:
        return None
    return source.replace(mutant.old, mutant.new)


def run_mutant(
    scratch: Path, env: dict[str, str], mutant: Mutant, extra: Sequence[str], timeout_s: float
) -> Verdict:
    target = scratch / mutant.path
    original = target.read_text()
    mutated = apply(original, mutant)
    if mutated is None:
        found = original.count(mutant.old)
        return Verdict(mutant, "DID-NOT-APPLY", 0.0, f"old snippet found {found} times")
    started = time.monotonic()
    target.write_text(mutated)
    try:
        code, tail = run_pytest(scratch, env, mutant.tests, extra, timeout_s)
    finally:
        target.write_text(original)
    seconds = time.monotonic() - started
    if code is None:
        return Verdict(mutant, "TIMEOUT", seconds, tail)
    if code == 0:
        return Verdict(mutant, "SURVIVED", seconds, tail)
    if code == 1:
        return Verdict(mutant, "killed", seconds)
    return Verdict(mutant, "ERROR", seconds, f"pytest exit code {code}\n{tail}")


def list_mutants(mutants: Sequence[Mutant]) -> None:
    """The table, each row marked with whether it applies to this checkout."""
    for m in mutants:
        applies = apply((REPO / m.path).read_text(), m) is not None
        print(f"{m.id:5} {m.protects}{'' if applies else '  [DOES NOT APPLY here]'}")
        print(f"      mutation: {m.what} ({m.path})")
        for t in m.tests:
            print(f"      test: {t}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--only", action="append", default=[], help="row id(s), e.g. W11 or G3,G4")
    parser.add_argument("--timeout-s", type=float, default=1200.0, help="per mutant (default 1200)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("-k", dest="keyword", help="passed to pytest -k (e.g. sqlite)")
    parser.add_argument(
        "--test",
        action="append",
        default=[],
        help="run this node id instead of the row's tests (to show that one test catches it)",
    )
    args = parser.parse_args(argv)
    mutants = select_mutants(args.only)
    if args.test:
        mutants = [replace(m, tests=tuple(args.test)) for m in mutants]
    if args.list:
        list_mutants(mutants)
        return 0
    extra = ["-k", args.keyword] if args.keyword else []
    scratch = Path(tempfile.mkdtemp(prefix="trapline-mutants-"))
    try:
        copy_repo(scratch / "repo")
        root = scratch / "repo"
        env = scratch_env(root)
        check_imports(root, env)
        print(f"scratch copy: {root} (trapline imports from it)", flush=True)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {len(tests)} test node(s) without any mutation ...", flush=True)
            code, tail = run_pytest(root, env, tests, extra, args.timeout_s * 2)
            if code != 0:
                print(f"baseline failed (exit {code}); mutants would prove nothing:\n{tail}")
                return 2
        verdicts: list[Verdict] = []
        for m in mutants:
            v = run_mutant(root, env, m, extra, args.timeout_s)
            verdicts.append(v)
            print(f"{v.outcome:13} {m.id:5} {v.seconds:6.1f}s  {m.what}", flush=True)
            if v.detail:
                print("    " + v.detail.replace("\n", "\n    "), flush=True)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    bad = [v for v in verdicts if v.outcome != "killed"]
    print(f"\n{len(verdicts) - len(bad)} of {len(verdicts)} mutants killed")
    for v in bad:
        print(f"  {v.outcome}: {v.mutant.id} {v.mutant.protects}: {v.mutant.what}")
        for t in v.mutant.tests:
            print(f"      {t}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
