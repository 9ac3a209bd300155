"""The verb registry drives the RPC method table and qvirsh; docs/protocol.md must not drift
from it: every verb documented with every param, nothing documented that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qvirtd.cli import UsageError, build_parser, normalise, params_from
from qvirtd.verbs import VERBS, ArgKind, Target, combine_target

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# Params that exist only for old scripts: documented as such, not required in the table.
OLD_SPELLINGS = {("attach-device", "config"), ("detach-device", "config")}


def documented() -> dict[str, str]:
    """Method name -> its params cell, from the table under "## Methods"."""
    section = PROTOCOL.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        for name in re.findall(r"`([a-z-]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def test_every_verb_is_documented_and_nothing_else() -> None:
    assert set(documented()) == set(VERBS), (set(documented()) ^ set(VERBS))


@pytest.mark.parametrize("name", sorted(VERBS))
def test_the_documented_params_are_the_real_ones(name: str) -> None:
    cell = documented()[name]
    fields = set(VERBS[name].params.model_fields)
    mentioned = set(re.findall(r"`([a-z_]+)`", cell))
    if not fields:
        assert cell.strip() == "none", cell
    for f in fields - {p for v, p in OLD_SPELLINGS if v == name}:
        assert f in mentioned, f"docs/protocol.md: '{name}' does not mention param '{f}'"


@pytest.mark.parametrize("name", sorted(VERBS))
def test_every_verb_parses_with_json_and_socket_after_it(name: str) -> None:
    v = VERBS[name]
    argv = [name]
    for a in v.args:
        if a.flag is None and not a.optional:
            argv.append("/x.json" if a.kind is ArgKind.JSON_FILE else
                        '{"execute": "query-status"}' if a.kind is ArgKind.JSON_TEXT else "x")
    if name == "change-media":
        argv.append("--eject")
    args = build_parser().parse_args(normalise([*argv, "--json", "--socket", "/s"]))
    assert args.verb == name and args.json is True and args.socket == "/s"
    assert v.summary and v.summary == v.summary.strip() and "\n" not in v.summary


def test_help_lists_every_verb_with_its_summary() -> None:
    text = build_parser().format_help()
    for v in VERBS.values():
        assert v.name in text


def test_shutdown_wait_parses_before_and_after_the_name() -> None:
    p = build_parser()
    for argv, wait in ((["shutdown", "--wait", "vm"], True), (["shutdown", "vm", "--wait"], True),
                       (["shutdown", "--wait", "7", "vm"], 7.0), (["shutdown", "vm"], False)):
        args = p.parse_args(normalise(argv))
        assert (args.name, args.wait) == ("vm", wait), argv


def test_device_change_targets_as_virsh_spells_them() -> None:
    p = build_parser()

    def mode(*flags: str) -> str | None:
        args = p.parse_args(["detach-device", "vm", "d0", *flags])
        return params_from(VERBS["detach-device"], args).get("mode")

    assert mode() is None  # the daemon's default: current
    assert mode("--config") == "config"
    assert mode("--live") == "live"
    assert mode("--persistent") == "persistent"
    assert mode("--live", "--config") == "persistent"
    with pytest.raises(UsageError, match="cannot be given together"):
        mode("--current", "--config")
    assert {combine_target({t}) for t in ("current", "live", "config", "persistent")} == \
        {str(t) for t in Target}


def test_old_config_param_keeps_its_meaning() -> None:
    """Scripts that sent `config: true` meant the running domain and its definition."""
    params = VERBS["attach-device"].params
    assert params.model_validate({"name": "vm", "device": {}, "config": True}).target \
        is Target.PERSISTENT  # type: ignore[attr-defined]
    assert params.model_validate({"name": "vm", "device": {}}).target \
        is Target.CURRENT  # type: ignore[attr-defined]
