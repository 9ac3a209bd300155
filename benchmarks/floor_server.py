"""The floor for a query: a bare uvloop JSON-lines server that answers every request with the
reply qvirtd gives to `dominfo` (issue 12).

It does what any JSON-RPC server over a UNIX socket must do per call and nothing more: read a
line (asyncio streams), parse it, build the reply object around the request's id, encode it,
write it. No validation, no lookup, no lock, no task per request. The daemon's CPU time per
call over this one's is the overhead of everything qvirtd adds.

Two JSON libraries: `stdlib` (json, as the issue's floor) and `pydantic-core` (from_json and
to_json, which qvirtd itself uses): the tighter floor.

Usage: python floor_server.py SOCKET RESULT_JSON [stdlib|pydantic-core]   (runs until killed)
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvloop
from pydantic_core import from_json, to_json


async def serve(path: str, result: Any, fast: bool) -> None:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = from_json(line) if fast else json.loads(line)
                reply = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
                writer.write((to_json(reply) if fast else
                              json.dumps(reply, separators=(",", ":")).encode()) + b"\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path=path)
    async with server:
        await server.serve_forever()


def main() -> None:
    path, result = sys.argv[1], json.loads(sys.argv[2])
    fast = len(sys.argv) > 3 and sys.argv[3] == "pydantic-core"
    uvloop.run(serve(path, result, fast))


if __name__ == "__main__":
    main()
