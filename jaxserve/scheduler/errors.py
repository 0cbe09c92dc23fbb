"""The errors the scheduler core raises when it ends a request. Each carries `status`, a gRPC status name
(the one vocabulary both fronts map from): the gRPC servicer ends the call with that status, the HTTP front
answers with the matching HTTP code. str(error) is the message for the client."""

from __future__ import annotations


class SchedulerError(Exception):
    status = "INTERNAL"

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class InvalidRequest(SchedulerError, ValueError):
    """A request the scheduler refuses as malformed or over the model's limits (400)."""

    status = "INVALID_ARGUMENT"


class Overloaded(SchedulerError):
    """The admission queue is full, or the request alone is larger than it (429)."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(SchedulerError):
    """No instance can serve the request, or it failed on too many instances (503)."""

    status = "UNAVAILABLE"


class DeadlineExceeded(SchedulerError):
    """The request's deadline passed while an instance was serving it (504)."""

    status = "DEADLINE_EXCEEDED"


class InstanceError(SchedulerError):
    """An instance ended the request with a status the scheduler passes on as it is (its name in `status`),
    e.g. FAILED_PRECONDITION or INVALID_ARGUMENT from the engine's own checks."""
