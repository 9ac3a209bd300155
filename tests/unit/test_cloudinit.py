"""The cloud-init NoCloud seed (qvirtd.cloudinit): an ISO 9660 image labelled cidata whose
files cloud-init finds by their Rock Ridge / Joliet names, with instance-id defaulted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pycdlib
import pytest
from pydantic import ValidationError

from qvirtd.cloudinit import attach_seed, build_iso, seed_files
from qvirtd.model import DomainDef

UUID = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"


def read_iso(data: bytes) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    label = iso.pvd.volume_identifier.decode().strip()
    files = {}
    for child in iso.list_children(rr_path="/"):
        name = child.rock_ridge.name().decode() if child.rock_ridge else ""
        if name in ("", ".", ".."):
            continue
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/" + name)
        files[name] = out.getvalue()
    iso.close()
    return label, files


def definition(**cloud_init: object) -> DomainDef:
    return DomainDef.model_validate({"name": "web", "uuid": UUID, "cloud_init": cloud_init})


def test_the_seed_is_labelled_cidata_with_the_files_cloud_init_reads() -> None:
    d = definition(user_data="#cloud-config\npackages: [htop]\n",
                   meta_data={"local-hostname": "web-1"},
                   network_config={"version": 2, "ethernets": {"eth0": {"dhcp4": True}}})
    label, files = read_iso(build_iso(seed_files(d)))
    assert label == "cidata"
    assert set(files) == {"user-data", "meta-data", "network-config"}
    assert files["user-data"] == b"#cloud-config\npackages: [htop]\n"
    meta = json.loads(files["meta-data"])  # JSON is YAML
    assert meta == {"instance-id": UUID, "local-hostname": "web-1"}
    assert json.loads(files["network-config"])["ethernets"]["eth0"]["dhcp4"] is True


def test_instance_id_defaults_to_the_uuid_also_in_yaml_text() -> None:
    meta = seed_files(definition(meta_data="local-hostname: h\n"))["meta-data"].decode()
    assert meta.splitlines()[0] == f"instance-id: {UUID}" and "local-hostname: h" in meta
    assert meta.count("local-hostname") == 1
    kept = seed_files(definition(meta_data="instance-id: mine\n"))["meta-data"].decode()
    assert kept.count("instance-id") == 1 and "instance-id: mine" in kept
    assert "network-config" not in seed_files(definition())


async def test_the_live_definition_has_the_seed_as_its_cdrom(tmp_path: Path) -> None:
    d = definition(user_data="#cloud-config\n")
    live = await attach_seed(d, tmp_path)
    assert live.cloud_init is None
    assert [(c.id, c.path) for c in live.cdroms] == [("cidata", str(tmp_path / "cidata.iso"))]
    label, files = read_iso((tmp_path / "cidata.iso").read_bytes())
    assert label == "cidata" and files["user-data"] == b"#cloud-config\n"
    plain = DomainDef(name="plain")
    assert await attach_seed(plain, tmp_path) is plain


def test_cidata_is_reserved_beside_cloud_init() -> None:
    with pytest.raises(ValidationError, match="cidata"):
        DomainDef.model_validate({"name": "x", "cloud_init": {}, "cdroms": [{"id": "cidata"}]})
    with pytest.raises(ValidationError, match="NUL"):
        definition(user_data="a\x00b")
