"""QMP event -> state, reason, events and follow-ups (ops/qmp_events.apply), one by one.

The integration tests drive the common events through a real guest; here every handler's
decision table is checked directly, including events the test guest cannot produce on demand
(watchdog, I/O errors, RTC and balloon changes, PM suspend).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from qvirtd.config import Layout, Settings
from qvirtd.domain import Domain
from qvirtd.events import Event
from qvirtd.model import DomainDef, DomainState, Reason
from qvirtd.ops import qmp_events
from qvirtd.ops.context import Context
from qvirtd.ops.qmp_events import FollowUpKind
from qvirtd.run import Run


class Harness:
    def __init__(self, tmp: Path, **definition: Any) -> None:
        self.ctx = Context(Settings(), Layout.under_root(tmp))
        definition_ = DomainDef(name="vm", **definition)
        self.dom = Domain(definition_, persistent=True)
        run_dir = tmp / "run" / "domains" / "vm"
        run_dir.mkdir(parents=True)
        self.run = Run(definition_, run_dir, 1, "tcg")  # "QEMU exists"
        self.dom.run = self.run
        self.dom.state = DomainState.RUNNING
        self.dom.reason = Reason.BOOTED
        self.events: list[Event] = []
        self.ctx.bus.subscribe(callback=self.events.append)

    async def apply(self, event: str, /, **data: Any) -> qmp_events.FollowUp | None:
        async with self.dom.lock:  # as the pump does (rule L3)
            follow = qmp_events.apply(self.ctx, self.dom, self.run, event, data)
        await asyncio.sleep(0)  # the flush timer
        return follow

    def state(self) -> tuple[str, str]:
        return str(self.dom.state), str(self.dom.reason)

    def kinds(self) -> list[str]:
        out = [e.event + (f" {e.type}/{e.detail}" if e.type else "") for e in self.events]
        self.events.clear()
        return out


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_stop_reasons(h: Harness) -> None:
    await h.apply("STOP")
    assert h.state() == ("paused", "unknown") and h.kinds() == ["lifecycle suspended/paused"]
    await h.apply("RESUME")
    assert h.state() == ("running", "unpaused") and h.kinds() == ["lifecycle resumed/unpaused"]
    h.run.pause_hint = Reason.USER
    await h.apply("STOP")
    assert h.state() == ("paused", "user") and h.run.pause_hint is None
    await h.apply("STOP")  # already paused: nothing new
    assert h.kinds() == ["lifecycle suspended/paused"]


async def test_io_error_then_stop_is_an_ioerror_pause(h: Harness) -> None:
    await h.apply("BLOCK_IO_ERROR", device="", **{"node-name": "fmt-d0"}, operation="read",
                  action="stop", nospace=False, reason="Input/output error")
    assert h.events[0].data == {"device": None, "node": "fmt-d0", "operation": "read",
                                "action": "stop", "nospace": False,
                                "reason": "Input/output error"}
    await h.apply("STOP")
    assert h.state() == ("paused", "ioerror")
    assert h.kinds() == ["io-error", "lifecycle suspended/ioerror"]


async def test_io_error_that_does_not_stop(h: Harness) -> None:
    await h.apply("BLOCK_IO_ERROR", device="d0", operation="write", action="report")
    assert h.run.pause_hint is None and h.state() == ("running", "booted")
    assert h.kinds() == ["io-error"]


async def test_watchdog_pause(h: Harness) -> None:
    await h.apply("WATCHDOG", action="pause")
    await h.apply("STOP")
    assert h.state() == ("paused", "watchdog")
    assert h.kinds() == ["watchdog", "lifecycle suspended/watchdog"]


async def test_resume_while_starting_is_left_to_start(h: Harness) -> None:
    h.dom.state, h.dom.reason, h.run.starting = DomainState.PAUSED, Reason.STARTING_UP, True
    await h.apply("RESUME")
    assert h.state() == ("paused", "starting up") and h.kinds() == []


@pytest.mark.parametrize(("on_poweroff", "state", "follow"), [
    ("destroy", ("shutdown", "shutdown"), FollowUpKind.KILL),
    ("restart", ("shutdown", "shutdown"), FollowUpKind.RESET_CONTINUE),
    ("preserve", ("paused", "shutdown"), None),
])
async def test_guest_poweroff_follows_on_poweroff(tmp_path: Path, on_poweroff: str,
                                                  state: tuple[str, str],
                                                  follow: FollowUpKind | None) -> None:
    h = Harness(tmp_path, on_poweroff=on_poweroff)
    result = await h.apply("SHUTDOWN", guest=True, reason="guest-shutdown")
    assert h.state() == state
    assert (result.kind if result else None) is follow
    assert h.events[0].data == {"initiator": "guest", "qemu_reason": "guest-shutdown"}
    assert h.kinds() == ["lifecycle shutdown/finished"]
    assert h.run.stop_reason is (Reason.SHUTDOWN if follow is FollowUpKind.KILL else None)
    assert h.run.saw_shutdown


async def test_reboot_request_turns_the_poweroff_into_a_reset(h: Harness) -> None:
    h.run.fake_reboot = True
    result = await h.apply("SHUTDOWN", guest=True, reason="guest-shutdown")
    assert result is not None and result.kind is FollowUpKind.RESET_CONTINUE
    assert h.run.stop_reason is None


async def test_guest_reset_with_on_reboot_destroy(tmp_path: Path) -> None:
    h = Harness(tmp_path, on_reboot="destroy")
    result = await h.apply("SHUTDOWN", guest=True, reason="guest-reset")
    assert result is not None and result.kind is FollowUpKind.KILL


async def test_host_quit_and_repeated_shutdowns(h: Harness) -> None:
    assert await h.apply("SHUTDOWN", guest=False, reason="host-qmp-quit") is None
    assert h.state() == ("shutdown", "user") and h.kinds() == ["lifecycle shutdown/finished"]
    assert await h.apply("SHUTDOWN", guest=False, reason="host-signal") is None
    assert h.kinds() == []


async def test_our_own_sigterm_is_not_announced(h: Harness) -> None:
    h.run.stop_reason = Reason.DESTROYED
    assert await h.apply("SHUTDOWN", guest=False, reason="host-signal") is None
    assert h.state() == ("running", "booted") and h.kinds() == [] and not h.run.saw_shutdown


async def test_firmware_resets_fold_into_one_reboot(h: Harness) -> None:
    await h.apply("RESET", guest=False, reason="host-qmp-system-reset")
    await h.apply("RESET", guest=True, reason="guest-reset")
    await h.apply("RESET", guest=True, reason="guest-reset")
    assert h.kinds() == ["reboot"]
    h.run.last_reset_at -= qmp_events.REBOOT_COALESCE_S + 1  # much later: a new reboot
    await h.apply("RESET", guest=True, reason="guest-reset")
    await h.apply("RESET", guest=False, reason="host-qmp-system-reset")  # host: always
    assert h.kinds() == ["reboot", "reboot"]


async def test_pm_suspend_and_wakeup(h: Harness) -> None:
    await h.apply("SUSPEND")
    assert h.state() == ("pmsuspended", "unknown")
    assert h.kinds() == ["lifecycle pmsuspended/memory", "pm-suspend"]
    await h.apply("WAKEUP")
    assert h.state() == ("running", "wakeup")
    assert h.kinds() == ["lifecycle started/wakeup", "pm-wakeup"]
    await h.apply("SUSPEND_DISK")
    assert h.kinds() == ["lifecycle pmsuspended/disk", "pm-suspend"]


@pytest.mark.parametrize(("on_crash", "follow", "stop_reason"), [
    ("destroy", FollowUpKind.KILL, Reason.CRASHED),
    ("restart", FollowUpKind.RESET_CONTINUE, None),
    ("preserve", None, None),
])
async def test_guest_panic_follows_on_crash(tmp_path: Path, on_crash: str,
                                            follow: FollowUpKind | None,
                                            stop_reason: Reason | None) -> None:
    h = Harness(tmp_path, on_crash=on_crash)
    result = await h.apply("GUEST_PANICKED", action="pause",
                           info={"type": "hyper-v", "arg1": 1})
    assert h.state() == ("crashed", "panicked")
    assert (result.kind if result else None) is follow
    assert h.run.stop_reason is stop_reason
    assert h.kinds() == ["lifecycle crashed/panicked", "guest-panic"]


async def test_device_deleted_only_for_the_device_itself(h: Harness) -> None:
    await h.apply("DEVICE_DELETED", path="/machine/peripheral/disk1/virtio-backend")
    await h.apply("DEVICE_DELETED", device="disk1", path="/machine/peripheral/disk1")
    assert [(e.event, e.data) for e in h.events] == [
        ("device-removed", {"device": "disk1", "path": "/machine/peripheral/disk1"})]


async def test_rtc_balloon_powerdown_and_unknown(h: Harness) -> None:
    await h.apply("RTC_CHANGE", offset=3600, **{"qom-path": "/machine/unattached/device[9]"})
    await h.apply("BALLOON_CHANGE", actual=64 * 2**20)
    await h.apply("POWERDOWN")
    await h.apply("NIC_RX_FILTER_CHANGED", name="n0")
    assert [(e.event, e.data) for e in h.events] == [
        ("rtc-change", {"utc_offset_s": 3600}),
        ("balloon-change", {"actual_bytes": 64 * 2**20})]
    assert h.run.balloon_actual_bytes == 64 * 2**20
    assert h.state() == ("running", "booted")


async def test_agent_lifecycle_from_vserport_change(h: Harness) -> None:
    await h.apply("VSERPORT_CHANGE", id="qga0", open=True)
    assert h.run.agent_connected is True
    assert [e.data for e in h.events] == [{"state": "connected"}]
    h.events.clear()
    await h.apply("VSERPORT_CHANGE", id="other", open=True)  # not the agent's port
    await h.apply("VSERPORT_CHANGE", id="qga0", open=False)
    assert h.run.agent_connected is False
    assert [(e.event, e.data) for e in h.events] == [("agent-lifecycle",
                                                      {"state": "disconnected"})]
