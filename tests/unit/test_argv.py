"""QEMU command line (qvirtd.qemu.argv): no value can inject an option, and the flags are right.

The splitter below follows QemuOpts' rules: options are separated by a single comma, a doubled
comma is a literal comma inside a value, and each option is `key=value` (the first one may be
a bare value for the option's implied key). If a hostile value could end a value early, it
would show up here as an extra key or a changed value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from qvirtd.model import MAC_PATTERN, DomainDef
from qvirtd.qemu.argv import LaunchPaths, build_argv, default_mac

POSITIONAL = "<positional>"

# Options that take no argument; every other option takes exactly one.
FLAGS = {"-S", "-no-shutdown", "-nodefaults", "-no-user-config", "-no-reboot"}
QEMUOPTS_OPTIONS = {"-machine", "-chardev", "-mon", "-name", "-action"}
JSON_OPTIONS = {"-device", "-blockdev", "-netdev"}
PLAIN_OPTIONS = {"-uuid", "-m", "-smp", "-display", "-cpu", "-kernel", "-initrd", "-append",
                 "-pidfile", "-global"}
CONSOLE_FD = 8

HOSTILE = [
    ",server=on,id=x",
    "a,,b",
    "a,b",
    "trailing,",
    ",leading",
    ",,,",
    "with space",
    "tab\there",
    "eq=sign=more",
    "\u00fcnic\u00f8de-\u540d\u524d-\U0001f600",
    'quote"and\\backslash',
    "{\"driver\":\"x\"}",
    "-device foo",
    "x,readonly=on,,,file=/etc/shadow",
]


def split_qemuopts(text: str) -> list[tuple[str, str]]:
    """Split a QemuOpts string into (key, value) pairs; a bare first item is POSITIONAL."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    pairs: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        key, sep, value = item.partition("=")
        if not sep:
            assert index == 0, f"bare value {item!r} that is not first in {text!r}"
            pairs.append((POSITIONAL, item))
        else:
            pairs.append((key, value))
    return pairs


def as_dict(text: str) -> dict[str, str]:
    pairs = split_qemuopts(text)
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key repeats in {text!r}"
    return dict(pairs)


def test_splitter_itself() -> None:
    assert split_qemuopts("file,id=a,path=/x,,y") == [
        (POSITIONAL, "file"), ("id", "a"), ("path", "/x,y")]
    assert split_qemuopts("path=a,,,id=b") == [("path", "a,"), ("id", "b")]
    assert split_qemuopts("path=a,,,,b") == [("path", "a,,b")]
    assert split_qemuopts("k=a=b") == [("k", "a=b")]
    # An unescaped comma in a value injects a key: the splitter must see it.
    assert split_qemuopts("path=/x,server=on") == [("path", "/x"), ("server", "on")]


def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option, argument) pairs; fails on anything that is not a known option."""
    out: list[tuple[str, str | None]] = []
    i = 1
    while i < len(argv):
        option = argv[i]
        if option in FLAGS:
            out.append((option, None))
            i += 1
            continue
        assert option in QEMUOPTS_OPTIONS | JSON_OPTIONS | PLAIN_OPTIONS, (
            f"unexpected argv element {option!r} at {i}")
        assert i + 1 < len(argv), f"{option} has no argument"
        out.append((option, argv[i + 1]))
        i += 2
    return out


def args_of(argv: list[str], option: str) -> list[str]:
    return [arg for opt, arg in parse_argv(argv) if opt == option and arg is not None]


def json_args(argv: list[str], option: str) -> list[dict[str, Any]]:
    return [json.loads(arg) for arg in args_of(argv, option)]


def launch_paths(run_dir: Path) -> LaunchPaths:
    return LaunchPaths(run_dir)


RUN = launch_paths(Path("/run/qvirtd/domains/vm"))


def build(raw: dict[str, Any], accel: str = "tcg", paths: LaunchPaths = RUN,
          fd: int = 7, cpu: str | None = None) -> list[str]:
    definition = DomainDef.model_validate({"name": "vm", **raw})
    return build_argv(definition, accel, "qemu-system-x86_64", fd, paths, cpu, CONSOLE_FD)


def check_qemuopts_options(argv: list[str], name: str, fd: int, accel: str,
                           console_fd: int | None = CONSOLE_FD) -> None:
    """Every QemuOpts option has exactly the keys we put there, with their values intact."""
    machines = args_of(argv, "-machine")
    assert len(machines) == 1
    assert as_dict(machines[0]) == {POSITIONAL: "q35", "accel": accel, "usb": "off",
                                    "dump-guest-core": "off"}

    names = args_of(argv, "-name")
    assert len(names) == 1
    assert as_dict(names[0]) == {"guest": name, "debug-threads": "on"}

    mons = args_of(argv, "-mon")
    assert len(mons) == 1
    assert as_dict(mons[0]) == {"chardev": "qmp", "mode": "control"}

    chardevs = [as_dict(c) for c in args_of(argv, "-chardev")]
    assert len(chardevs) == 2
    by_id = {c["id"]: c for c in chardevs}
    assert by_id["qmp"] == {POSITIONAL: "socket", "id": "qmp", "fd": str(fd), "server": "on",
                            "wait": "off"}
    if console_fd is None:
        assert by_id["serial0"] == {POSITIONAL: "null", "id": "serial0"}
    else:
        assert by_id["serial0"] == {POSITIONAL: "socket", "id": "serial0",
                                    "fd": str(console_fd), "server": "on", "wait": "off"}


def hostile_definition(value: str) -> dict[str, Any]:
    return {
        "boot": {"kernel": f"/boot/k{value}", "initrd": f"/boot/i{value}",
                 "cmdline": f"console=ttyS0 {value}"},
        "disks": [{"id": "d0", "path": f"/img/{value}.img"},
                  {"id": "d1", "path": f"/img/{value}", "format": "qcow2", "readonly": True}],
        "cdroms": [{"id": "cd0", "path": f"/iso/{value}.iso"}, {"id": "cd1"}],
        "nics": [{"id": "n0"}],
    }


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_cannot_inject_options(value: str) -> None:
    raw = hostile_definition(value)
    argv = build(raw)
    parse_argv(argv)  # only known options, each with its argument
    check_qemuopts_options(argv, "vm", 7, "tcg")

    # Kernel, initrd and cmdline are single argv elements, passed verbatim.
    assert args_of(argv, "-kernel") == [raw["boot"]["kernel"]]
    assert args_of(argv, "-initrd") == [raw["boot"]["initrd"]]
    assert args_of(argv, "-append") == [raw["boot"]["cmdline"]]

    # JSON options are valid JSON and carry the paths exactly.
    blockdevs = json_args(argv, "-blockdev")
    files = {b["node-name"]: b["filename"] for b in blockdevs if b["driver"] == "file"}
    assert files == {
        "file-d0": f"/img/{value}.img",
        "file-d1": f"/img/{value}",
        "file-cd0": f"/iso/{value}.iso",
    }
    for dev in json_args(argv, "-device") + json_args(argv, "-netdev"):
        assert isinstance(dev, dict)


@pytest.mark.parametrize("value", HOSTILE)
def test_run_dir_with_hostile_characters_is_escaped(value: str) -> None:
    paths = launch_paths(Path(f"/tmp/qvirtd root{value}/run,dir/domains/vm"))
    argv = build({"disks": [{"id": "d0", "path": "/img/a.img"}]}, paths=paths, fd=12)
    parse_argv(argv)
    check_qemuopts_options(argv, "vm", 12, "tcg")
    # The run directory appears once, as the pid file: a plain argument, never QemuOpts.
    assert args_of(argv, "-pidfile") == [str(paths.run_dir / "qemu.pid")]
    elsewhere = [a for o, a in parse_argv(argv) if o != "-pidfile" and a is not None]
    assert not any(str(paths.run_dir) in a for a in elsewhere)


@pytest.mark.parametrize("name", ["vm", "web-01", "db_2.prod+x", "a" * 64])
def test_name_round_trips(name: str) -> None:
    definition = DomainDef.model_validate({"name": name})
    argv = build_argv(definition, "tcg", "qemu", 3, RUN)
    check_qemuopts_options(argv, name, 3, "tcg", console_fd=None)


def test_blockdev_nodes_link_format_to_file_and_readonly() -> None:
    argv = build({
        "disks": [{"id": "d0", "path": "/img/a.img"},
                  {"id": "d1", "path": "/img/b.qcow2", "format": "qcow2", "readonly": True}],
        "cdroms": [{"id": "cd0", "path": "/iso/x.iso"}],
    })
    nodes = {b["node-name"]: b for b in json_args(argv, "-blockdev")}
    assert nodes["fmt-d0"]["driver"] == "raw" and nodes["fmt-d0"]["file"] == "file-d0"
    assert nodes["fmt-d1"]["driver"] == "qcow2" and nodes["fmt-d1"]["file"] == "file-d1"
    assert nodes["file-d0"]["read-only"] is False and nodes["fmt-d0"]["read-only"] is False
    assert nodes["file-d1"]["read-only"] is True and nodes["fmt-d1"]["read-only"] is True
    assert nodes["file-cd0"]["read-only"] is True and nodes["fmt-cd0"]["read-only"] is True
    devices = {d["id"]: d for d in json_args(argv, "-device")}
    assert devices["d0"]["drive"] == "fmt-d0"
    assert devices["d1"]["drive"] == "fmt-d1"
    assert devices["cd0"]["drive"] == "fmt-cd0"


def test_empty_cdrom_has_no_blockdev_and_no_drive() -> None:
    argv = build({"cdroms": [{"id": "cd0"}, {"id": "cd1", "path": "/iso/x.iso"}]})
    assert {b["node-name"] for b in json_args(argv, "-blockdev")} == {"file-cd1", "fmt-cd1"}
    devices = {d["id"]: d for d in json_args(argv, "-device")}
    assert "drive" not in devices["cd0"] and devices["cd1"]["drive"] == "fmt-cd1"
    assert devices["cd0"]["driver"] == devices["cd1"]["driver"] == "scsi-cd"
    assert devices["cd0"]["bus"] == devices["cd1"]["bus"] == "scsi0.0"
    # ... on the virtio-scsi controller, which is declared before them, on a root port.
    order = [d["id"] for d in json_args(argv, "-device")]
    assert order.index("scsi0") < order.index("cd0")
    assert devices["scsi0"]["driver"] == "virtio-scsi-pci"


def test_netdev_backends() -> None:
    argv = build({"nics": [{"id": "n0"},
                           {"id": "n1", "backend": "tap", "ifname": "tap0"},
                           {"id": "n2", "backend": "bridge", "bridge": "br0"}]})
    netdevs = {n["id"]: n for n in json_args(argv, "-netdev")}
    assert netdevs["net-n0"] == {"type": "user", "id": "net-n0"}
    assert netdevs["net-n1"]["type"] == "tap" and netdevs["net-n1"]["ifname"] == "tap0"
    assert netdevs["net-n2"]["type"] == "bridge" and netdevs["net-n2"]["br"] == "br0"
    devices = {d["id"]: d for d in json_args(argv, "-device")}
    for nic in ("n0", "n1", "n2"):
        assert devices[nic]["driver"] == "virtio-net-pci"
        assert devices[nic]["netdev"] == f"net-{nic}"


# --- required flags ------------------------------------------------------------------------

def test_required_flags_present() -> None:
    argv = build({})
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-S", "-no-shutdown", "-nodefaults", "-no-user-config"):
        assert flag in argv
    assert args_of(argv, "-machine")[0].startswith("q35,accel=tcg")
    assert args_of(argv, "-m") == ["128M"]
    assert args_of(argv, "-smp") == ["1"]
    assert args_of(argv, "-display") == ["none"]


def test_memory_vcpus_and_uuid() -> None:
    given = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"
    argv = build({"memory_mib": 2048, "vcpus": 4, "uuid": given})
    assert args_of(argv, "-m") == ["2048M"]
    assert args_of(argv, "-smp") == ["4"]
    assert args_of(argv, "-uuid") == [given]


@pytest.mark.parametrize(
    ("on_reboot", "expected"), [("restart", False), ("destroy", True), ("preserve", True)])
def test_no_reboot_only_when_reboot_does_not_restart(on_reboot: str, expected: bool) -> None:
    argv = build({"on_reboot": on_reboot})
    assert ("-no-reboot" in argv) is expected


@pytest.mark.parametrize(("accel", "cpu"), [("kvm", "host"),
                                            ("kvm", "host,arch-capabilities=off"),
                                            ("tcg", None)])
def test_cpu_model_as_given(accel: str, cpu: str | None) -> None:
    argv = build({}, accel=accel, cpu=cpu)
    if cpu is None:
        assert "-cpu" not in argv
    else:
        assert args_of(argv, "-cpu") == [cpu]
    assert as_dict(args_of(argv, "-machine")[0])["accel"] == accel


def test_no_kernel_options_without_boot() -> None:
    argv = build({})
    for option in ("-kernel", "-initrd", "-append"):
        assert option not in argv


def test_kernel_without_initrd_or_cmdline() -> None:
    argv = build({"boot": {"kernel": "/boot/vmlinuz"}})
    assert args_of(argv, "-kernel") == ["/boot/vmlinuz"]
    assert "-initrd" not in argv
    assert "-append" not in argv


# --- PCIe topology -------------------------------------------------------------------------

def check_topology(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Every device on a root port sits on one declared before it; returns ports, users."""
    ports: list[str] = []
    chassis_ports: set[tuple[int, int]] = set()
    addrs: set[tuple[int, int]] = set()
    users: dict[str, str] = {}
    for dev in json_args(argv, "-device"):
        if dev["driver"] == "pcie-root-port":
            assert dev["bus"] == "pcie.0"
            assert dev["id"] not in ports
            key = (dev["chassis"], dev["port"])
            assert key not in chassis_ports, "chassis/port reused"
            chassis_ports.add(key)
            slot_s, func_s = dev["addr"].split(".")
            addr = (int(slot_s, 16), int(func_s))
            assert addr not in addrs, f"pcie.0 address {dev['addr']} used twice"
            assert 0 < addr[0] < 31 and 0 <= addr[1] < 8
            # Function 0 of each slot must exist and be multifunction for the others to work.
            if addr[1] == 0:
                assert dev.get("multifunction") is True
            else:
                assert (addr[0], 0) in addrs, f"{dev['addr']} before its slot's function 0"
            addrs.add(addr)
            ports.append(dev["id"])
        elif dev["driver"] in ("virtio-blk-pci", "virtio-net-pci", "virtio-scsi-pci"):
            assert dev["bus"] in ports, f"{dev['id']} on {dev['bus']} before it is declared"
            assert dev["bus"] not in users, f"{dev['bus']} used twice"
            users[dev["bus"]] = dev["id"]
    return ports, users


@pytest.mark.parametrize("hotplug_ports", [0, 1, 4, 32])
def test_every_pci_device_sits_on_its_own_root_port(hotplug_ports: int) -> None:
    argv = build({
        "disks": [{"id": "d0", "path": "/a"}, {"id": "d1", "path": "/b"}],
        "cdroms": [{"id": "cd0"}],
        "nics": [{"id": "n0"}, {"id": "n1"}, {"id": "n2"}],
        "hotplug_ports": hotplug_ports,
    })
    ports, users = check_topology(argv)
    assert sorted(users.values()) == ["d0", "d1", "n0", "n1", "n2", "scsi0"]
    assert len(ports) == 6 + hotplug_ports
    assert len(set(ports) - set(users)) == hotplug_ports


def test_no_devices_only_hotplug_ports() -> None:
    ports, users = check_topology(build({"hotplug_ports": 3}))
    assert len(ports) == 4 and list(users.values()) == ["scsi0"]


def test_device_ids_are_the_definition_ids() -> None:
    argv = build({"disks": [{"id": "root", "path": "/a"}], "nics": [{"id": "lan"}],
                  "cdroms": [{"id": "install"}]})
    ids = {d["id"] for d in json_args(argv, "-device")}
    assert {"root", "lan", "install"} <= ids


# --- MAC addresses -------------------------------------------------------------------------

UUID_A = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"
UUID_B = "0e4b1a2c-3d4e-4f50-8a6b-7c8d9e0f1a2b"


def test_default_mac_is_stable_and_locally_administered() -> None:
    mac = default_mac(UUID_A, "n0")
    assert mac == default_mac(UUID_A, "n0")
    assert re.fullmatch(MAC_PATTERN, mac)
    assert mac.startswith("52:54:00:")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02, "locally administered bit"
    assert not first & 0x01, "unicast"


def test_default_mac_differs_per_device_and_domain() -> None:
    macs = {default_mac(u, d) for u in (UUID_A, UUID_B) for d in ("n0", "n1", "n2")}
    assert len(macs) == 6


def test_nic_device_uses_given_mac_or_stable_default() -> None:
    raw = {"uuid": UUID_A, "nics": [{"id": "n0"}, {"id": "n1", "mac": "52:54:00:aa:bb:cc"}]}
    first = {d["id"]: d for d in json_args(build(raw), "-device")}
    second = {d["id"]: d for d in json_args(build(raw), "-device")}
    assert first["n0"]["mac"] == default_mac(UUID_A, "n0") == second["n0"]["mac"]
    assert first["n1"]["mac"] == "52:54:00:aa:bb:cc"


# --- QEMU's own limits ---------------------------------------------------------------------

# QEMU keeps a block node name in a 32-byte buffer: at most 31 characters ("Node name too
# long" otherwise). q35's pcie.0 has 30 free slots (slot 0 is the host bridge, slot 31 the
# ICH9 functions): root ports are packed 8 to a multifunction slot, so they fit.
MAX_NODE_NAME = 31
PCIE0_FREE_SLOTS = 30


def valid_or_none(raw: dict[str, Any]) -> DomainDef | None:
    """The definition, or None when the model refuses it (refusing is a fine answer too)."""
    try:
        return DomainDef.model_validate({"name": "vm", **raw})
    except ValueError:
        return None


@pytest.mark.parametrize("kind", ["disks", "cdroms"])
def test_block_node_names_fit_qemus_limit_for_every_valid_id(kind: str) -> None:
    # The longest id the model accepts (it must accept some, and that one must fit).
    definition = next(d for n in range(64, 0, -1)
                      if (d := valid_or_none({kind: [{"id": "d" * n, "path": "/img/a.img"}]})))
    argv = build_argv(definition, "tcg", "qemu", 3, RUN)
    for node in json_args(argv, "-blockdev"):
        assert len(node["node-name"]) <= MAX_NODE_NAME, node["node-name"]


@pytest.mark.parametrize(
    "raw",
    [
        {"nics": [{"id": f"n{i}"} for i in range(32)]},
        {"hotplug_ports": 32},
        {"disks": [{"id": f"d{i}", "path": f"/img/{i}"} for i in range(16)],
         "nics": [{"id": f"n{i}"} for i in range(16)], "hotplug_ports": 0},
    ],
)
def test_root_ports_fit_on_pcie0_for_every_valid_definition(raw: dict[str, Any]) -> None:
    definition = valid_or_none(raw)
    if definition is None:
        return
    argv = build_argv(definition, "tcg", "qemu", 3, RUN)
    ports, _ = check_topology(argv)
    slots = {d["addr"].split(".")[0] for d in json_args(argv, "-device")
             if d["driver"] == "pcie-root-port"}
    assert len(ports) > PCIE0_FREE_SLOTS or raw.get("hotplug_ports") != 32
    assert len(slots) <= PCIE0_FREE_SLOTS


# --- firmware and boot order -----------------------------------------------------------------

def test_uefi_firmware_is_two_pflash_block_nodes() -> None:
    from qvirtd.qemu.firmware import Firmware
    fw = Firmware(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/var/lib/q/nvram/u_VARS.fd"),
                  secure_boot=False)
    definition = DomainDef.model_validate({"name": "vm", "firmware": "uefi"})
    argv = build_argv(definition, "tcg", "qemu", 3, RUN, None, 4, fw)
    machine = as_dict(args_of(argv, "-machine")[0])
    assert (machine["pflash0"], machine["pflash1"]) == ("fw-code", "fw-vars")
    assert "smm" not in machine and "-global" not in argv
    nodes = {b["node-name"]: b for b in json_args(argv, "-blockdev")}
    assert nodes["fw-code-file"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert nodes["fw-code-file"]["read-only"] is True and nodes["fw-code"]["read-only"] is True
    assert nodes["fw-vars-file"]["filename"] == "/var/lib/q/nvram/u_VARS.fd"
    assert "read-only" not in nodes["fw-vars-file"]


def test_secure_boot_turns_smm_and_secure_flash_on() -> None:
    from qvirtd.qemu.firmware import Firmware
    fw = Firmware(Path("/c.fd"), Path("/v.fd"), secure_boot=True)
    definition = DomainDef.model_validate({"name": "vm", "firmware": "uefi",
                                           "secure_boot": True})
    argv = build_argv(definition, "tcg", "qemu", 3, RUN, None, 4, fw)
    assert as_dict(args_of(argv, "-machine")[0])["smm"] == "on"
    assert args_of(argv, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]


def test_boot_order_becomes_bootindex() -> None:
    argv = build({"disks": [{"id": "d0", "path": "/a.img", "boot_order": 2},
                            {"id": "d1", "path": "/b.img"}],
                  "cdroms": [{"id": "cd0", "path": "/x.iso", "boot_order": 1}],
                  "nics": [{"id": "n0", "boot_order": 3}, {"id": "n1"}]})
    devices = {d.get("id"): d for d in json_args(argv, "-device")}
    assert devices["d0"]["bootindex"] == 2 and "bootindex" not in devices["d1"]
    assert devices["cd0"]["bootindex"] == 1
    assert devices["n0"]["bootindex"] == 3 and "romfile" not in devices["n0"]  # boot ROM
    assert devices["n1"]["romfile"] == "" and "bootindex" not in devices["n1"]


def test_guest_agent_channel() -> None:
    argv = build_argv(DomainDef.model_validate({"name": "vm", "guest_agent": True,
                                                "disks": [{"id": "d0", "path": "/a"}]}),
                      "tcg", "qemu", 3, RUN, None, 4, None, 9)
    chardevs = {as_dict(c)["id"]: as_dict(c) for c in args_of(argv, "-chardev")}
    assert chardevs["qga0"] == {POSITIONAL: "socket", "id": "qga0", "fd": "9",
                                "server": "on", "wait": "off"}
    devices = {d.get("id"): d for d in json_args(argv, "-device")}
    assert devices["vser0"]["driver"] == "virtio-serial-pci" and devices["vser0"]["bus"] == "rp1"
    assert devices["qga0"] == {"driver": "virtserialport", "id": "qga0", "bus": "vser0.0",
                               "chardev": "qga0", "name": "org.qemu.guest_agent.0"}
    assert devices["d0"]["bus"] == "rp2"  # the controller takes a root port of its own
    with pytest.raises(ValueError, match="listening socket"):
        build_argv(DomainDef.model_validate({"name": "vm", "guest_agent": True}), "tcg", "q",
                   3, RUN)
