"""QMP events -> domain state, reason and our events. Pure state logic, no I/O, no awaits.

`apply()` is called by the run's event pump with the domain lock held (rule L3). It changes
state and reason and queues events (E1) right there. Anything that needs the monitor or the
process (a reset-and-continue, a kill, finishing a detach) is returned as a `FollowUp`, which
the caller records on the run (and in its status file) for the run's follow-up runner: an
event handler never talks to QEMU itself.

The mapping to libvirt's event vocabulary is documented in docs/events.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..domain import Domain
from ..model import DomainState, LifecycleAction, Reason
from ..run import FollowUp, FollowUpKind, Run
from .context import Context

log = logging.getLogger(__name__)

__all__ = ["FollowUp", "FollowUpKind", "apply", "resync"]


def _action(ctx: Context, dom: Domain, run: Run, action: LifecycleAction, stop_reason: Reason,
            why: str) -> FollowUp | None:
    """Turn an on_poweroff/on_reboot/on_crash action into state now and a follow-up."""
    if action is LifecycleAction.DESTROY:
        run.stop_reason = stop_reason
        return FollowUp(FollowUpKind.KILL, why)
    if action is LifecycleAction.RESTART:
        return FollowUp(FollowUpKind.RESET_CONTINUE, why)
    return None  # preserve: QEMU stays, stopped, for inspection


def _shutdown(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    guest = bool(data.get("guest"))
    qemu_reason = str(data.get("reason", ""))
    if dom.state is DomainState.SHUTDOWN or (run.stop_reason is not None and not guest):
        # A repeated SHUTDOWN, or QEMU acknowledging the SIGTERM we sent it (destroy, or the
        # kill after a guest power-off): the stop is already under way and will be announced.
        return None
    run.saw_shutdown = True
    ctx.set_state(dom, DomainState.SHUTDOWN, Reason.SHUTDOWN if guest else Reason.USER)
    ctx.emit(dom, "lifecycle", "shutdown", "finished",
             {"initiator": "guest" if guest else "host", "qemu_reason": qemu_reason})
    return _poweroff_action(ctx, dom, run, guest, qemu_reason)


def _poweroff_action(ctx: Context, dom: Domain, run: Run, guest: bool,
                     qemu_reason: str) -> FollowUp | None:
    """What to do once the guest has powered off (QEMU stopped, -no-shutdown)."""
    definition = run.definition
    if run.fake_reboot and guest:
        return FollowUp(FollowUpKind.RESET_CONTINUE, "reboot")
    if qemu_reason == "guest-reset":
        action, why = definition.on_reboot, "on_reboot"
    elif qemu_reason == "guest-panic":
        action, why = definition.on_crash, "on_crash"
    elif guest:
        action, why = definition.on_poweroff, "on_poweroff"
    else:
        return None  # the host asked QEMU to quit: it is exiting on its own
    if action is LifecycleAction.PRESERVE:
        ctx.set_state(dom, DomainState.PAUSED, Reason.SHUTDOWN)
    return _action(ctx, dom, run, action, Reason.SHUTDOWN, why)


def _stop(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    if dom.state is DomainState.RUNNING:
        reason = run.pause_hint or Reason.UNKNOWN
        detail = {Reason.IOERROR: "ioerror", Reason.WATCHDOG: "watchdog",
                  Reason.MIGRATING: "migrated"}.get(reason, "paused")
        ctx.set_state(dom, DomainState.PAUSED, reason, ("suspended", detail))
    run.pause_hint = None
    return None


def _resume(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    # While starting, or after SHUTDOWN (a reset-and-continue), the operation sets the state.
    if dom.state is DomainState.PAUSED and not run.starting:
        ctx.set_state(dom, DomainState.RUNNING, Reason.UNPAUSED, ("resumed", "unpaused"))
    return None


# After a reset, SeaBIOS finds it has already run POST and resets the machine again itself,
# once or twice, within ~0.1 s (QEMU reports each as a guest reset). One reboot is one event:
# a guest reset this soon after the previous reset is part of it.
REBOOT_COALESCE_S = 2.0


def _reset(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    now = time.monotonic()
    guest = bool(data.get("guest"))
    follows_reset = now - run.last_reset_at < REBOOT_COALESCE_S
    run.last_reset_at = now
    if guest and follows_reset:
        log.debug("domain %s: firmware reset folded into the reboot in progress", dom.name)
        return None
    ctx.emit(dom, "reboot", data={"initiator": "guest" if guest else "host",
                                  "qemu_reason": data.get("reason")})
    return None


def _powerdown(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    # QEMU acknowledges the ACPI power button; what the guest does about it comes later.
    log.info("domain %s: ACPI power button delivered", dom.name)
    return None


def _suspend(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    ctx.set_state(dom, DomainState.PMSUSPENDED, Reason.UNKNOWN, ("pmsuspended", "memory"))
    ctx.emit(dom, "pm-suspend")
    return None


def _suspend_disk(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    ctx.set_state(dom, DomainState.PMSUSPENDED, Reason.UNKNOWN, ("pmsuspended", "disk"))
    ctx.emit(dom, "pm-suspend", data={"target": "disk"})
    return None


def _wakeup(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    if dom.state is DomainState.PMSUSPENDED:
        ctx.set_state(dom, DomainState.RUNNING, Reason.WAKEUP, ("started", "wakeup"))
    ctx.emit(dom, "pm-wakeup")
    return None


def _panicked(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    # QEMU runs with -action panic=pause: the vCPUs are stopped, on_crash decides.
    ctx.set_state(dom, DomainState.CRASHED, Reason.PANICKED, ("crashed", "panicked"))
    info = data.get("info")
    if info:
        ctx.emit(dom, "guest-panic", data={"info": info})
    return _action(ctx, dom, run, run.definition.on_crash, Reason.CRASHED, "on_crash")


def _device_deleted(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    # QEMU sends DEVICE_DELETED for the device and for its parts (a virtio backend, with only
    # a QOM path): only the event that names the device id counts.
    device = data.get("device")
    if not device:
        return None
    ctx.emit(dom, "device-removed", data={"device": device, "path": data.get("path")})
    # Recorded whether or not a detach is still waiting for this event: if it is, it finishes
    # the removal first and the follow-up then finds nothing left to do; if it is not (it
    # gave up, or is between its wait and its check), the follow-up finishes it.
    if device in run.pending_detach:
        return FollowUp(FollowUpKind.FINISH_DETACH, f"detach-{device}", device)
    return None


def _block_io_error(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    action = str(data.get("action", ""))
    if action == "stop":
        run.pause_hint = Reason.IOERROR  # the STOP that follows is an I/O error pause
    ctx.emit(dom, "io-error", data={
        "device": data.get("device") or None, "node": data.get("node-name"),
        "operation": data.get("operation"), "action": action,
        "nospace": bool(data.get("nospace", False)), "reason": data.get("reason")})
    return None


def _watchdog(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    action = str(data.get("action", ""))
    if action == "pause":
        run.pause_hint = Reason.WATCHDOG
    ctx.emit(dom, "watchdog", data={"action": action})
    return None


def _rtc_change(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    ctx.emit(dom, "rtc-change", data={"utc_offset_s": data.get("offset")})
    return None


def _balloon_change(ctx: Context, dom: Domain, run: Run, data: dict[str, Any]) -> FollowUp | None:
    actual = data.get("actual")
    if isinstance(actual, int):
        run.balloon_actual_bytes = actual
    ctx.emit(dom, "balloon-change", data={"actual_bytes": actual})
    return None


def _vserport_change(ctx: Context, dom: Domain, run: Run,
                     data: dict[str, Any]) -> FollowUp | None:
    # The guest opened or closed a virtio-serial port: for the agent's, qemu-ga started or
    # stopped (libvirt's agent lifecycle event).
    if data.get("id") != "qga0":
        return None
    connected = bool(data.get("open"))
    run.agent_connected = connected
    if run.agent is not None:
        run.agent.guest_connected = connected
    ctx.emit(dom, "agent-lifecycle",
             data={"state": "connected" if connected else "disconnected"})
    return None


Handler = Callable[[Context, Domain, Run, dict[str, Any]], FollowUp | None]

HANDLERS: dict[str, Handler] = {
    "SHUTDOWN": _shutdown,
    "POWERDOWN": _powerdown,
    "STOP": _stop,
    "RESUME": _resume,
    "RESET": _reset,
    "SUSPEND": _suspend,
    "SUSPEND_DISK": _suspend_disk,
    "WAKEUP": _wakeup,
    "GUEST_PANICKED": _panicked,
    "DEVICE_DELETED": _device_deleted,
    "BLOCK_IO_ERROR": _block_io_error,
    "WATCHDOG": _watchdog,
    "RTC_CHANGE": _rtc_change,
    "BALLOON_CHANGE": _balloon_change,
    "VSERPORT_CHANGE": _vserport_change,
}


_PAUSED_STATUSES = frozenset({"paused", "prelaunch", "postmigrate", "finish-migrate",
                              "inmigrate", "restore-vm", "save-vm", "debug", "colo",
                              "internal-error"})


def resync(ctx: Context, dom: Domain, run: Run, qemu_status: str) -> FollowUp | None:
    """After a reconnect (caller holds the domain lock): bring state in line with QEMU's run
    state (`query-status`), announcing what changed while the daemon was away, and redo an
    action the previous daemon decided but did not finish."""
    state, reason = dom.state, dom.reason
    if qemu_status == "running":
        if state is not DomainState.RUNNING:
            ctx.set_state(dom, DomainState.RUNNING, Reason.UNPAUSED, ("resumed", "unpaused"))
    elif qemu_status in _PAUSED_STATUSES:
        if state is not DomainState.PAUSED:
            ctx.set_state(dom, DomainState.PAUSED, Reason.UNKNOWN, ("suspended", "paused"))
    elif qemu_status in ("io-error", "watchdog"):
        why = Reason.IOERROR if qemu_status == "io-error" else Reason.WATCHDOG
        if (state, reason) != (DomainState.PAUSED, why):
            ctx.set_state(dom, DomainState.PAUSED, why, ("suspended", qemu_status.replace(
                "io-error", "ioerror")))
    elif qemu_status == "suspended":
        ctx.set_state(dom, DomainState.PMSUSPENDED, Reason.UNKNOWN, ("pmsuspended", "memory"))
    elif qemu_status == "guest-panicked":
        if state is DomainState.CRASHED:  # seen, but its on_crash action was not done
            return _action(ctx, dom, run, run.definition.on_crash, Reason.CRASHED, "on_crash")
        return _panicked(ctx, dom, run, {})
    elif qemu_status == "shutdown":
        if (state, reason) == (DomainState.PAUSED, Reason.SHUTDOWN):
            return None  # on_poweroff = preserve: as it should be
        if state is DomainState.SHUTDOWN:  # seen, but its action was not done
            return _poweroff_action(ctx, dom, run, True, "guest-shutdown")
        return _shutdown(ctx, dom, run, {"guest": True, "reason": "guest-shutdown"})
    else:
        log.warning("domain %s: unknown QEMU run state %r", dom.name, qemu_status)
    return None


def apply(ctx: Context, dom: Domain, run: Run, name: str,
          data: dict[str, Any]) -> FollowUp | None:
    """Apply one QMP event (caller holds the domain lock and has checked the run, L5)."""
    dom.assert_locked()
    handler = HANDLERS.get(name)
    if handler is None:
        log.debug("domain %s: QMP event %s ignored", dom.name, name)
        return None
    return handler(ctx, dom, run, data)
