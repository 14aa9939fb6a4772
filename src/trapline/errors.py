"""The exception tree. Each area raises its own subclass; the HTTP edge maps them once."""


class TraplineError(Exception):
    """Root of every error trapline raises on purpose."""


class ConfigError(TraplineError):
    """Raised when settings are missing or contradictory."""


class QueueError(TraplineError):
    """Raised when the task queue (NATS JetStream) cannot do what was asked."""


class QueueUnavailable(QueueError):
    """Raised when NATS cannot be reached or does not answer in time."""


class ReceiptError(QueueError):
    """Raised when a reply subject is not a receipt of the job's consumer."""


class LedgerError(TraplineError):
    """Raised when the SQL ledger cannot complete an operation."""


class NotFound(TraplineError):
    """Raised when a job, image, token or pipeline does not exist."""


class Conflict(TraplineError):
    """Raised when an operation does not fit the current state (e.g. cancelling a finished job)."""


class InvalidRequest(TraplineError):
    """Raised when a request is well-formed JSON but its content cannot be accepted."""

    def __init__(self, message: str, errors: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class AuthError(TraplineError):
    """Raised when a request carries no token or an unknown one."""


class Forbidden(TraplineError):
    """Raised when a valid token lacks the role or project for the request."""


class PipelineError(TraplineError):
    """Raised when a pipeline cannot be found, loaded or run."""


class WorkerError(TraplineError):
    """Raised when the worker cannot continue (server refused it, bad configuration)."""


class DeliveryError(WorkerError):
    """Raised when a result batch cannot be delivered within its deadline."""
