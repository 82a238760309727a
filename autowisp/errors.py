"""Exception hierarchy: every error says what was wrong and what to do about it.

A step raises :class:`TransientError` for a failure that may go away on a retry (a file
system hiccup, a lock, a busy service) and :class:`PermanentError` for one that will not
(bad data, a missing input that will never appear). The runner retries transient errors
with backoff up to a bound, marks permanent ones dead at once, and treats any other
exception as transient (it may be an out-of-memory or a flaky library) until the bound.
"""

from __future__ import annotations

__all__ = [
    "AutowispError",
    "ConfigurationError",
    "IngestError",
    "NotFoundError",
    "PermanentError",
    "StepDefinitionError",
    "TransientError",
]


class AutowispError(Exception):
    """Base class of AutoWISP's own errors."""


class ConfigurationError(AutowispError):
    """The configuration (file, environment or parameters) is invalid."""


class StepDefinitionError(AutowispError):
    """A step or the DAG of steps is declared wrongly (a programming error)."""


class IngestError(AutowispError):
    """A file cannot be ingested; the message is recorded as the rejection reason."""


class NotFoundError(AutowispError, LookupError):
    """Something named by id or name (a field, a night) is not in the database."""


class TransientError(AutowispError):
    """A step failed in a way that a retry may fix."""


class PermanentError(AutowispError):
    """A step failed in a way that retrying cannot fix; the task is marked dead."""
