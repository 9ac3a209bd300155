"""Errors an operation can end with. Each has a stable `kind` that clients can branch on.

The message is written for a person: it names the domain, the operation and what went wrong,
so that `qvirsh` can print it as it is. One root, `QvirtError`; the tree (kind in brackets):

    QvirtError [failed]
     +-- NoDomainError [no-domain]
     +-- InvalidOperationError [invalid-operation]
     |    +-- DomainBusyError [domain-busy]      a QEMU of the domain exists outside our view
     +-- InvalidDefinitionError [invalid-definition]
     +-- InvalidParamsError [invalid-params]
     +-- JobTimeoutError [job-timeout]
     +-- JobAbortedError [job-aborted]
     +-- MonitorError [monitor]
     |    +-- MonitorTimeoutError [monitor-timeout]
     |    +-- MonitorClosedError [monitor-closed]
     +-- DomainGoneError [domain-gone]
     +-- AgentError [agent]                       the guest agent: not there, no answer, refused
     +-- ProcessError [process]
     +-- StorageError [storage]                   a file could not be written; names the path
     +-- RawQmpRefusedError [qmp-refused]         qemu-monitor-command without --force
     +-- LockDisciplineError [lock-discipline]
     +-- ReplayGapError [replay-gap]
"""

from __future__ import annotations

from pydantic import ValidationError


class QvirtError(Exception):
    """An operation the daemon refused or could not finish."""

    kind = "failed"


class NoDomainError(QvirtError):
    kind = "no-domain"


class InvalidOperationError(QvirtError):
    """The operation does not fit the domain's current state (e.g. start a running domain)."""

    kind = "invalid-operation"


class DomainBusyError(InvalidOperationError):
    """A QEMU of this domain runs outside the daemon's view (the process table says so)."""

    kind = "domain-busy"


class InvalidDefinitionError(QvirtError):
    kind = "invalid-definition"


class JobTimeoutError(QvirtError):
    """Waited `job_wait_timeout_s` for another job on the domain; names the holder."""

    kind = "job-timeout"


class JobAbortedError(QvirtError):
    """An async job stopped because `domjobabort` asked it to."""

    kind = "job-aborted"


class MonitorError(QvirtError):
    """A QMP command failed: QEMU refused it, did not answer in time, or went away."""

    kind = "monitor"

    def __init__(self, message: str, qmp_class: str | None = None) -> None:
        super().__init__(message)
        self.qmp_class = qmp_class  # QEMU's error class when QEMU refused the command


class MonitorTimeoutError(MonitorError):
    kind = "monitor-timeout"


class MonitorClosedError(MonitorError):
    kind = "monitor-closed"


class DomainGoneError(QvirtError):
    """The domain stopped (or was restarted) while the operation waited on something."""

    kind = "domain-gone"


class AgentError(QvirtError):
    """The guest agent is not connected, did not answer within agent_timeout_s, or refused."""

    kind = "agent"


class ProcessError(QvirtError):
    kind = "process"


class StorageError(QvirtError):
    """A file could not be written or removed; the message names the path and the OS error."""

    kind = "storage"


class RawQmpRefusedError(QvirtError):
    """A raw QMP command that could break the JSON-config invariant, sent without --force."""

    kind = "qmp-refused"


class LockDisciplineError(QvirtError):
    """A QMP command or process wait was awaited while holding a driver or domain lock."""

    kind = "lock-discipline"


class InvalidParamsError(QvirtError):
    """Params that passed the envelope but not the method's own checks."""

    kind = "invalid-params"


class ReplayGapError(QvirtError):
    """A subscriber asked to resume from a seq no longer in the replay buffer: re-read state."""

    kind = "replay-gap"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Every offending field, named by its path, as one line."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "(top)")
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
