"""Which raw QMP commands `qemu-monitor-command` passes through without `--force`.

The rule of seed 004: nothing may exist in a live QEMU without an entry in its JSON config.
A raw command that adds or removes devices, block nodes, netdevs, chardevs or objects would
change QEMU behind the JSON config's back; `migrate` with an `exec:` URI runs a host command
as the daemon's user; `human-monitor-command` can do all of that in HMP syntax; and a few
commands write host files anywhere the daemon may. Those are refused unless the caller says
`--force`. A forced command marks the run tainted (`custom-monitor`, as libvirt does): shown
in `dominfo`, recorded in the status file, logged with who asked.

Everything else (queries, `stop`/`cont`, `system_reset`, `set_link`, ...) passes as it is.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidOperationError

TAINT_CUSTOM_MONITOR = "custom-monitor"

_DEVICES = "it adds or removes a device, which the JSON config would not list"
_BLOCK = "it changes the block graph (nodes, media or block jobs) behind the JSON config"
_NETDEV = "it adds or removes a network backend behind the JSON config"
_CHARDEV = "it adds, changes or removes a character device behind the JSON config"
_OBJECT = "it adds or removes a QOM object (such as a memory backend on a host file)"
_MIGRATE = "migration is the daemon's job (and an exec: URI runs a host command)"
_HMP = "HMP can do anything the refused QMP commands do"
_FILES = "it writes a host file with the daemon's rights"
_FDS = "file descriptors are the daemon's to pass"
_OWNED = "the daemon does this itself"

REFUSED: dict[str, str] = {
    **dict.fromkeys(("device_add", "device_del"), _DEVICES),
    **dict.fromkeys((
        "blockdev-add", "blockdev-del", "blockdev-reopen", "blockdev-create",
        "blockdev-change-medium", "blockdev-insert-medium", "blockdev-remove-medium",
        "blockdev-snapshot", "blockdev-snapshot-sync", "blockdev-snapshot-internal-sync",
        "blockdev-snapshot-delete-internal-sync", "blockdev-mirror", "blockdev-backup",
        "drive-mirror", "drive-backup", "block-commit", "block-stream",
        "x-blockdev-change", "x-blockdev-insert-medium", "x-blockdev-remove-medium",
        "x-blockdev-set-iothread", "block-export-add", "block-export-del",
        "nbd-server-start", "nbd-server-add", "nbd-server-remove", "nbd-server-stop",
        "transaction", "eject"), _BLOCK),
    **dict.fromkeys(("netdev_add", "netdev_del"), _NETDEV),
    **dict.fromkeys(("chardev-add", "chardev-change", "chardev-remove"), _CHARDEV),
    **dict.fromkeys(("object-add", "object-del"), _OBJECT),
    **dict.fromkeys(("migrate", "migrate-incoming", "migrate-recover",
                     "migrate-set-parameters", "migrate-set-capabilities",
                     "migrate_cancel", "migrate-continue", "migrate-pause"), _MIGRATE),
    "human-monitor-command": _HMP,
    **dict.fromkeys(("dump-guest-memory", "screendump", "pmemsave", "memsave",
                     "snapshot-save", "snapshot-load", "snapshot-delete"), _FILES),
    **dict.fromkeys(("add-fd", "remove-fd", "getfd", "closefd"), _FDS),
    **dict.fromkeys(("qmp_capabilities",), _OWNED),
}


def check_raw_command(message: dict[str, Any]) -> str:
    """The command's name, or InvalidOperationError for a message that is not one command."""
    command = message.get("execute")
    if not isinstance(command, str) or not command:
        raise InvalidOperationError("command: needs an 'execute' member naming the command")
    if "exec-oob" in message:
        raise InvalidOperationError("command: out-of-band execution is not passed through")
    extra = set(message) - {"execute", "arguments", "id"}
    if extra:
        raise InvalidOperationError(f"command: unknown member(s) {', '.join(sorted(extra))}")
    if "arguments" in message and not isinstance(message["arguments"], dict):
        raise InvalidOperationError("command: 'arguments' must be an object")
    if command == "qmp_capabilities":
        raise InvalidOperationError("command: qmp_capabilities is done by the daemon")
    return command


def refused_reason(command: str) -> str | None:
    """Why `command` needs --force, or None when it may pass."""
    return REFUSED.get(command)
