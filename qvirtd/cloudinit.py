"""Cloud-init's NoCloud seed: a small ISO 9660 image labelled `cidata`, built at each start.

A definition's `cloud_init` (`user_data`, `meta_data`, `network_config`) becomes the files
`user-data`, `meta-data` and `network-config` of an ISO 9660 image with the volume label
`cidata` (Joliet and Rock Ridge names, as genisoimage -J -r makes them, so the guest sees
the names cloud-init looks for), written to the run directory (`cidata.iso`) and attached
read-only as the CD-ROM `cidata`. That CD-ROM is an ordinary entry of the run's live
definition, the JSON config, so the seed-004 invariant holds for it like for any device.

`meta_data` may be an object (it is written as JSON, which is YAML) or YAML text; its
`instance-id` defaults to the domain's uuid and `local-hostname` to its name, so cloud-init
runs once per domain, not once per start. In the live definition (`dumpjson` of a running
domain, the status file) the seed is the CD-ROM `cidata` and `cloud_init` is empty: the JSON
config describes what QEMU has.

The image is built with pycdlib: a maintained pure-Python library, so building needs no
external program (no fork and exec per start, nothing more to install on the host) and
takes a few milliseconds for a few kilobytes. It runs in a worker thread (rule L6).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path

from .errors import StorageError
from .model import CdromDef, CloudInitDef, DomainDef

CIDATA_ID = "cidata"
SEED_FILE = "cidata.iso"
VOLUME_LABEL = "cidata"


def seed_files(definition: DomainDef) -> dict[str, bytes]:
    """The seed's files for `definition` (which has `cloud_init`)."""
    ci = definition.cloud_init
    assert ci is not None
    files = {"user-data": ci.user_data.encode(), "meta-data": _meta_data(ci, definition)}
    if ci.network_config is not None:
        network = ci.network_config
        files["network-config"] = (network if isinstance(network, str)
                                   else json.dumps(network, indent=1)).encode()
    return files


def _meta_data(ci: CloudInitDef, definition: DomainDef) -> bytes:
    defaults = {"instance-id": str(definition.uuid), "local-hostname": definition.name}
    if ci.meta_data is None or isinstance(ci.meta_data, dict):
        meta = {**defaults, **(ci.meta_data or {})}
        return json.dumps(meta, indent=1).encode()
    text = ci.meta_data
    lines = [f"{key}: {value}" for key, value in defaults.items()
             if not any(line.startswith(f"{key}:") for line in text.splitlines())]
    return ("\n".join([*lines, text]) + "\n").encode()


def build_iso(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image labelled `cidata` holding `files` (Joliet and Rock Ridge names).
    Called in a worker thread; pycdlib is imported on first use, not at daemon start (it
    and what it imports are about 2 MiB of a daemon that may never build a seed: issue 12)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME_LABEL)
    for name, data in files.items():
        iso.add_fp(io.BytesIO(data), len(data), "/" + name.upper().replace("-", "_") + ".;1",
                   rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def _write_seed(path: Path, definition: DomainDef) -> None:
    """Blocking (worker thread): build the seed and write it (atomically, read-only)."""
    write_run_files(path.parent, {path.name: build_iso(seed_files(definition))})


async def attach_seed(definition: DomainDef, run_dir: Path) -> DomainDef:
    """For a start: build the seed in `run_dir` (off the loop) and return the live definition:
    the seed as its CD-ROM `cidata`, in place of `cloud_init` (the JSON config says what QEMU
    has). A definition without `cloud_init` is returned as it is."""
    if definition.cloud_init is None:
        return definition
    path = run_dir / SEED_FILE
    await asyncio.to_thread(_write_seed, path, definition)
    return DomainDef.model_validate({
        **definition.model_dump(mode="json"), "cloud_init": None,
        "cdroms": [*definition.model_dump(mode="json")["cdroms"],
                   CdromDef(id=CIDATA_ID, path=str(path)).model_dump(mode="json")]})


# --- a seed that moves with its guest (save/restore, migration) -----------------------------

def run_files(run_dir: Path, definition: DomainDef) -> dict[str, bytes]:
    """Blocking: the files of a run that QEMU reads and that live in its run directory (the
    seed), for a save image or a migration to carry along."""
    if not any(c.id == CIDATA_ID and c.path == str(run_dir / SEED_FILE)
               for c in definition.cdroms):
        return {}
    try:
        return {SEED_FILE: (run_dir / SEED_FILE).read_bytes()}
    except OSError as exc:
        raise StorageError(f"cannot read the cloud-init seed {run_dir / SEED_FILE}: "
                           f"{exc.strerror or exc}") from exc


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Blocking: put a saved or migrated run's files into the new run directory. Only the
    names this module writes are accepted: a save file cannot place anything else."""
    for name, data in files.items():
        if name != SEED_FILE:
            raise StorageError(f"a saved run carries an unknown file {name!r}: refused")
        path = run_dir / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o400)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def seed_moved_to(definition: DomainDef, run_dir: Path) -> DomainDef:
    """The live definition of a saved or migrated run with its seed CD-ROM pointing into
    `run_dir` (where write_run_files puts it)."""
    target = str(run_dir / SEED_FILE)
    if not any(c.id == CIDATA_ID and c.path != target and c.path is not None
               and c.path.endswith("/" + SEED_FILE) for c in definition.cdroms):
        return definition
    data = definition.model_dump(mode="json")
    for cdrom in data["cdroms"]:
        if cdrom["id"] == CIDATA_ID:
            cdrom["path"] = target
    return DomainDef.model_validate(data)
