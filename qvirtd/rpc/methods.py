"""The daemon's JSON-RPC method table, built from the verb registry (qvirtd/verbs.py).

Method and param names are the `qvirsh` command and option names (the contract). Params are
validated by pydantic before any operation runs; an error names every offending field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..verbs import VERBS, Caller, EventParams, Params, Services

if TYPE_CHECKING:
    from .server import Connection

__all__ = ["Caller", "EventParams", "Method", "Params", "build_methods", "now_methods",
           "upgrade_methods"]

Handler = Callable[[Any, Caller], Awaitable[Any]]
ConnectionHandler = Callable[["Connection", Any], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    params: type[Params]
    handler: Handler
    doc: str


def upgrade_methods() -> frozenset[str]:
    """The methods after whose reply the connection carries raw bytes (console)."""
    return frozenset(name for name, v in VERBS.items() if v.upgrade)


def now_methods(svc: Services) -> dict[str, tuple[type[Params], Callable[[Connection, Any], Any]]]:
    """The verbs that can answer inline (`now=`): their params model and plain function."""
    table: dict[str, tuple[type[Params], Callable[[Connection, Any], Any]]] = {}
    for name, v in VERBS.items():
        if v.now is not None:
            def bound(conn: Connection, p: Any, now: Any = v.now) -> Any:
                return now(svc, p, conn)
            table[name] = (v.params, bound)
    return table


def build_methods(svc: Services) -> dict[str, tuple[type[Params], ConnectionHandler]]:
    """Every verb as a method of the server: its params model and a handler given the
    connection (which knows its caller, and owns what a stream verb sets up)."""
    table: dict[str, tuple[type[Params], ConnectionHandler]] = {}
    for name, v in VERBS.items():
        def bound(conn: Connection, p: Any, handler: Any = v.handler) -> Awaitable[Any]:
            return handler(svc, p, conn)  # type: ignore[no-any-return]
        table[name] = (v.params, bound)
    return table
