"""What the daemon asks the guest's agent (qemu-ga): addresses, OS facts, file system freeze,
a clean shutdown.

Each operation takes the domain's agent job (`ctx.agent_job`: its own condition, so an agent
call never waits for a monitor job and the reverse, as libvirt's agent jobs), calls the
agent with no lock held and a hard timeout (`agent_timeout_s`, qemu/agent.py), and re-checks
the run afterwards (L5).
"""

from __future__ import annotations

import logging
from typing import Any

from ..domain import Domain
from ..errors import AgentError, InvalidOperationError
from ..job import JobKind
from ..qemu.agent import GuestAgent
from ..run import Run
from .context import Context

log = logging.getLogger(__name__)


class Guest:
    """Guest agent operations."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def _agent(self, dom: Domain) -> tuple[Run, GuestAgent]:
        async with dom.lock:  # L3
            run = self.ctx.running(dom)
            if not run.definition.guest_agent:
                raise InvalidOperationError(f"domain '{dom.name}' has no guest agent channel "
                                            "(set \"guest_agent\": true and restart it)")
            if run.agent is None:
                raise AgentError(f"domain '{dom.name}': the guest agent channel is not "
                                 "connected (yet)")
            return run, run.agent

    async def call(self, dom: Domain, run: Run, agent: GuestAgent, command: str,
                   arguments: dict[str, Any] | None = None, reply: bool = True) -> Any:
        """One agent call (the caller holds the agent job), then the L5 re-check."""
        result = await agent.call(command, arguments,
                                  timeout_s=self.ctx.settings.agent_timeout_s, reply=reply)
        async with dom.lock:  # L5
            self.ctx.ensure_current(dom, run, command)
        return result

    async def interfaces(self, ident: str, owner: str) -> dict[str, Any]:
        """`domifaddr`: the guest's interfaces and addresses, as its agent reports them."""
        dom = await self.ctx.lookup(ident)
        async with self.ctx.agent_job(dom, JobKind.QUERY, owner):
            run, agent = await self._agent(dom)
            found = await self.call(dom, run, agent, "guest-network-get-interfaces")
        interfaces = [{"name": i.get("name"), "mac": i.get("hardware-address"),
                       "addresses": [{"type": a.get("ip-address-type"),
                                      "address": a.get("ip-address"),
                                      "prefix": a.get("prefix")}
                                     for a in i.get("ip-addresses") or []]}
                      for i in found or []]
        return {"name": dom.name, "interfaces": interfaces}

    async def info(self, ident: str, owner: str) -> dict[str, Any]:
        """`guestinfo`: OS, hostname, users and file systems. A part the agent does not
        support (or refuses) is reported as such; the others are still returned."""
        dom = await self.ctx.lookup(ident)
        out: dict[str, Any] = {"name": dom.name}
        async with self.ctx.agent_job(dom, JobKind.QUERY, owner):
            run, agent = await self._agent(dom)
            for key, command in (("os", "guest-get-osinfo"), ("hostname", "guest-get-host-name"),
                                 ("users", "guest-get-users"),
                                 ("filesystems", "guest-get-fsinfo")):
                try:
                    out[key] = await self.call(dom, run, agent, command)
                except AgentError as exc:
                    if "did not answer" in str(exc) or "not connected" in str(exc):
                        raise
                    out[key] = {"error": str(exc)}
        if isinstance(out.get("hostname"), dict) and "host-name" in out["hostname"]:
            out["hostname"] = out["hostname"]["host-name"]
        return out

    async def fsfreeze(self, ident: str, freeze: bool, owner: str) -> dict[str, Any]:
        """`domfsfreeze` / `domfsthaw`: how many file systems the guest froze or thawed."""
        dom = await self.ctx.lookup(ident)
        command = "guest-fsfreeze-freeze" if freeze else "guest-fsfreeze-thaw"
        async with self.ctx.agent_job(dom, JobKind.MODIFY, owner):
            run, agent = await self._agent(dom)
            count = await self.call(dom, run, agent, command)
        log.info("domain %s: %s by %s: %s file systems", dom.name, command, owner, count)
        return {"name": dom.name, "frozen" if freeze else "thawed": count}

    async def shutdown(self, dom: Domain, owner: str) -> Run:
        """`shutdown --mode agent`: the guest shuts itself down (no answer is awaited: the
        agent may go before it could give one)."""
        async with self.ctx.agent_job(dom, JobKind.MODIFY, owner):
            run, agent = await self._agent(dom)
            await self.call(dom, run, agent, "guest-shutdown", {"mode": "powerdown"},
                            reply=False)
        log.info("domain %s: shutdown through the guest agent by %s", dom.name, owner)
        return run
