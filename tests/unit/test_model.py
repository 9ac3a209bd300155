"""Domain definition validation (qvirtd.model): the contract examples, defaults and refusals."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qvirtd.model import (
    MAX_MEMORY_MIB,
    MAX_PATH_LEN,
    MAX_VCPUS,
    Accel,
    DomainDef,
    LifecycleAction,
    NicDef,
)
from qvirtd.ops.lifecycle import describe_validation_error

CONTRACT_DIR = Path(__file__).resolve().parents[3] / "shared" / "contract"


def refused(raw: dict[str, Any]) -> str:
    """Validate `raw`, expect a refusal, return the one-line description of it."""
    with pytest.raises(ValidationError) as info:
        DomainDef.model_validate(raw)
    return describe_validation_error(info.value)


def with_boot(**boot: Any) -> dict[str, Any]:
    return {"name": "vm", "boot": {"kernel": "/boot/vmlinuz", **boot}}


# --- contract examples ---------------------------------------------------------------------

@pytest.mark.parametrize("example", ["domain-minimal.json", "domain-example.json"])
def test_contract_example_validates_verbatim(example: str) -> None:
    path = CONTRACT_DIR / example
    if not path.exists():
        pytest.skip(f"contract example {path} not available")
    raw_bytes = path.read_bytes()
    raw = json.loads(raw_bytes)

    from_json = DomainDef.model_validate_json(raw_bytes)
    from_dict = DomainDef.model_validate(raw)

    # Every field the example gives survives as given.
    dumped = from_dict.model_dump(mode="json")
    for key, value in raw.items():
        assert dumped[key] == value, key
    assert from_json.model_dump(exclude={"uuid"}) == from_dict.model_dump(exclude={"uuid"})
    # A dumped definition is itself a valid definition (what the store writes is readable).
    assert DomainDef.model_validate(dumped) == from_dict


# --- defaults ------------------------------------------------------------------------------

def test_defaults_fill_what_is_missing() -> None:
    d = DomainDef.model_validate({"name": "tiny"})
    assert isinstance(d.uuid, uuid.UUID)
    assert d.accel is Accel.AUTO
    assert d.machine == "q35"
    assert d.memory_mib == 128
    assert d.vcpus == 1
    assert d.boot is None
    assert d.disks == [] and d.cdroms == [] and d.nics == []
    assert d.hotplug_ports == 4
    assert d.on_poweroff is LifecycleAction.DESTROY
    assert d.on_reboot is LifecycleAction.RESTART
    assert d.on_crash is LifecycleAction.DESTROY


def test_generated_uuid_differs_per_definition_and_given_uuid_is_kept() -> None:
    a = DomainDef.model_validate({"name": "a"})
    b = DomainDef.model_validate({"name": "a"})
    assert a.uuid != b.uuid
    given = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"
    assert str(DomainDef.model_validate({"name": "a", "uuid": given}).uuid) == given
    assert "uuid" in refused({"name": "a", "uuid": "not-a-uuid"})


def test_nic_backend_defaults_to_user() -> None:
    d = DomainDef.model_validate({"name": "vm", "nics": [{"id": "n0"}]})
    assert d.nics[0].backend == "user"
    assert d.nics[0].mac is None


# --- extra fields --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"name": "vm", "colour": "red"}, "colour"),
        ({"name": "vm", "boot": {"kernel": "/k", "bogus": 1}}, "boot.bogus"),
        ({"name": "vm", "disks": [{"id": "d0", "path": "/d.img", "cache": "none"}]},
         "disks.0.cache"),
        ({"name": "vm", "cdroms": [{"id": "cd0", "media": "/x.iso"}]}, "cdroms.0.media"),
        ({"name": "vm", "nics": [{"id": "n0", "model": "e1000"}]}, "nics.0.model"),
    ],
)
def test_extra_fields_are_refused_with_the_field_named(raw: dict[str, Any], where: str) -> None:
    assert f"{where}: unknown field" in refused(raw)


def test_every_offending_field_is_named() -> None:
    message = refused({"name": "a,b", "memory_mib": 1, "extra": True})
    assert "name:" in message
    assert "memory_mib:" in message
    assert "extra: unknown field" in message


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name",
    [
        "a,b",           # a QemuOpts separator
        "a/b",           # a path separator
        "../etc",
        ".hidden",
        "-rf",
        "_x",
        "a" * 65,        # too long
        "",
        "caf\u00e9",     # unicode letter
        "\u540d\u524d",  # CJK
        "\uff11",        # fullwidth digit
        "a b",
        "a\tb",
        "a=b",
        "a\n",           # a trailing newline must not slip through `$`
        "a\x00",
    ],
)
def test_bad_domain_names_are_refused(name: str) -> None:
    assert "name:" in refused({"name": name})


@pytest.mark.parametrize("name", ["a", "A9", "web-01", "db_2.prod+x", "a" * 64, "0day"])
def test_good_domain_names_are_accepted(name: str) -> None:
    assert DomainDef.model_validate({"name": name}).name == name


def test_name_is_required() -> None:
    assert "name:" in refused({})


@pytest.mark.parametrize("dev_id", ["", "0d", "d,x", "d/x", "d.x", "d" * 33, "d\u00e9", "d\n"])
def test_bad_device_ids_are_refused(dev_id: str) -> None:
    message = refused({"name": "vm", "disks": [{"id": dev_id, "path": "/d.img"}]})
    assert "disks.0.id:" in message


# --- sizes and counts ----------------------------------------------------------------------

@pytest.mark.parametrize("memory", [16, 64, MAX_MEMORY_MIB])
def test_memory_within_bounds_is_accepted(memory: int) -> None:
    assert DomainDef.model_validate({"name": "vm", "memory_mib": memory}).memory_mib == memory


@pytest.mark.parametrize("memory", [-1, 0, 15, MAX_MEMORY_MIB + 1, 1.5])
def test_memory_out_of_bounds_is_refused(memory: object) -> None:
    assert "memory_mib:" in refused({"name": "vm", "memory_mib": memory})


@pytest.mark.parametrize("vcpus", [1, 2, MAX_VCPUS])
def test_vcpus_within_bounds_are_accepted(vcpus: int) -> None:
    assert DomainDef.model_validate({"name": "vm", "vcpus": vcpus}).vcpus == vcpus


@pytest.mark.parametrize("vcpus", [0, -1, MAX_VCPUS + 1])
def test_vcpus_out_of_bounds_are_refused(vcpus: int) -> None:
    assert "vcpus:" in refused({"name": "vm", "vcpus": vcpus})


def test_machine_other_than_q35_is_refused() -> None:
    assert "machine:" in refused({"name": "vm", "machine": "pc"})


def test_unknown_accel_is_refused() -> None:
    assert "accel:" in refused({"name": "vm", "accel": "hvf"})


def test_cdroms_are_bounded_like_other_devices() -> None:
    many = [{"id": f"cd{i}"} for i in range(32)]
    assert len(DomainDef.model_validate({"name": "vm", "cdroms": many}).cdroms) == 32
    too_many = [{"id": f"cd{i}"} for i in range(33)]
    assert "cdroms:" in refused({"name": "vm", "cdroms": too_many})


def test_too_many_disks_are_refused() -> None:
    disks = [{"id": f"d{i}", "path": f"/img/{i}.img"} for i in range(33)]
    assert "disks:" in refused({"name": "vm", "disks": disks})


# --- paths ---------------------------------------------------------------------------------

BAD_PATHS = [
    "relative/disk.img",
    "disk.img",
    "./disk.img",
    "",
    "/img/a\x00b",
    "/img/a\nb",
    "/img/a\rb",
    "/" + "a" * MAX_PATH_LEN,
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_disk_paths_are_refused(path: str) -> None:
    assert "disks.0.path:" in refused(
        {"name": "vm", "disks": [{"id": "d0", "path": path}]})


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_cdrom_paths_are_refused(path: str) -> None:
    assert "cdroms.0.path:" in refused(
        {"name": "vm", "cdroms": [{"id": "cd0", "path": path}]})


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_kernel_and_initrd_paths_are_refused(path: str) -> None:
    assert "boot.kernel:" in refused({"name": "vm", "boot": {"kernel": path}})
    assert "boot.initrd:" in refused(with_boot(initrd=path))


@pytest.mark.parametrize(
    "path",
    ["/img/disk.img", "/img/with space,comma=and,,more", "/img/\u00fcnic\u00f8de.qcow2",
     "/" + "a" * (MAX_PATH_LEN - 1)],
)
def test_odd_but_absolute_paths_are_accepted_verbatim(path: str) -> None:
    d = DomainDef.model_validate({"name": "vm", "disks": [{"id": "d0", "path": path}]})
    assert d.disks[0].path == path


def test_cdrom_without_path_is_an_empty_tray() -> None:
    d = DomainDef.model_validate({"name": "vm", "cdroms": [{"id": "cd0"}]})
    assert d.cdroms[0].path is None


def test_disk_format_is_restricted() -> None:
    assert "disks.0.format:" in refused(
        {"name": "vm", "disks": [{"id": "d0", "path": "/d", "format": "vmdk"}]})


# --- boot ----------------------------------------------------------------------------------

def test_cmdline_with_nul_is_refused() -> None:
    assert "boot.cmdline:" in refused(with_boot(cmdline="console=ttyS0\x00x"))


def test_cmdline_too_long_is_refused() -> None:
    assert "boot.cmdline:" in refused(with_boot(cmdline="x" * 4097))


def test_initrd_or_cmdline_without_kernel_is_refused() -> None:
    assert "boot:" in refused({"name": "vm", "boot": {"initrd": "/boot/initrd"}})
    assert "boot:" in refused({"name": "vm", "boot": {"cmdline": "quiet"}})
    assert DomainDef.model_validate({"name": "vm", "boot": {}}).boot is not None


# --- devices -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "devices",
    [
        {"disks": [{"id": "x", "path": "/a"}, {"id": "x", "path": "/b"}]},
        {"disks": [{"id": "x", "path": "/a"}], "cdroms": [{"id": "x"}]},
        {"cdroms": [{"id": "x"}], "nics": [{"id": "x"}]},
        {"nics": [{"id": "x"}, {"id": "x"}]},
    ],
)
def test_duplicate_device_ids_are_refused(devices: dict[str, Any]) -> None:
    message = refused({"name": "vm", **devices})
    assert "'x'" in message and "twice" in message


def test_distinct_device_ids_across_kinds_are_accepted() -> None:
    d = DomainDef.model_validate({
        "name": "vm",
        "disks": [{"id": "d0", "path": "/a"}],
        "cdroms": [{"id": "cd0"}],
        "nics": [{"id": "n0"}],
    })
    assert [x.id for x in (*d.disks, *d.cdroms, *d.nics)] == ["d0", "cd0", "n0"]


def test_nic_bridge_backend_needs_bridge() -> None:
    with pytest.raises(ValidationError, match="needs 'bridge'"):
        NicDef.model_validate({"id": "n0", "backend": "bridge"})
    nic = NicDef.model_validate({"id": "n0", "backend": "bridge", "bridge": "br0"})
    assert nic.bridge == "br0"


def test_nic_tap_backend_needs_ifname() -> None:
    with pytest.raises(ValidationError, match="needs 'ifname'"):
        NicDef.model_validate({"id": "n0", "backend": "tap"})
    nic = NicDef.model_validate({"id": "n0", "backend": "tap", "ifname": "tap0"})
    assert nic.ifname == "tap0"


def test_nic_unknown_backend_is_refused() -> None:
    assert "nics.0.backend:" in refused({"name": "vm", "nics": [{"id": "n0", "backend": "vde"}]})


@pytest.mark.parametrize("field", ["ifname", "bridge"])
@pytest.mark.parametrize("value", ["", "a" * 16, "br,0", "br 0", "br/0", "br\u00e9"])
def test_nic_interface_names_are_restricted(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        NicDef.model_validate({"id": "n0", "backend": "tap", "ifname": "tap0", field: value})


@pytest.mark.parametrize("mac", ["52:54:00:12:34:56", "02:00:00:00:00:01"])
def test_good_mac_is_accepted(mac: str) -> None:
    assert NicDef.model_validate({"id": "n0", "mac": mac}).mac == mac


@pytest.mark.parametrize(
    "mac", ["52-54-00-12-34-56", "52:54:00:12:34", "52:54:00:12:34:56:78", "5254.0012.3456",
            "52:54:00:12:34:5g", "52:54:00:12:34:56,id=x"],
)
def test_bad_mac_is_refused(mac: str) -> None:
    with pytest.raises(ValidationError):
        NicDef.model_validate({"id": "n0", "mac": mac})


def test_firmware_secure_boot_and_boot_order_are_checked() -> None:
    from pydantic import ValidationError

    from qvirtd.model import DomainDef
    assert DomainDef.model_validate({"name": "vm"}).firmware == "bios"
    with pytest.raises(ValidationError, match="secure_boot needs firmware 'uefi'"):
        DomainDef.model_validate({"name": "vm", "secure_boot": True})
    with pytest.raises(ValidationError, match="boot_order 1 is used by both 'd0' and 'n0'"):
        DomainDef.model_validate({"name": "vm", "disks": [{"id": "d0", "path": "/a",
                                                            "boot_order": 1}],
                                  "nics": [{"id": "n0", "boot_order": 1}]})
    with pytest.raises(ValidationError, match="firmware"):
        DomainDef.model_validate({"name": "vm", "firmware": "coreboot"})
    with pytest.raises(ValidationError, match="boot_order"):
        DomainDef.model_validate({"name": "vm", "cdroms": [{"id": "c", "boot_order": 0}]})
