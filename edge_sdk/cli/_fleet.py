"""``rollout start|status|pause|resume|approve|abort|list|run``, ``device set|remove``,
``device pending|accept|reject|revoke|allow``, ``claim create|revoke|list`` and
``audit``: thin wrappers over edge_sdk.fleet. The CLI writes rollout records, commands
and device assignments to the fleet database; the controller inside ``edge-sdk serve``
carries them out (the database is the authority)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ._db import fleet_db, open_db, other_fleets
from ._release import parse_models, rollout_cmd

F = TypeVar("F", bound=Callable[..., Any])


def db_options(fn: F) -> F:
    fn = click.option("--repo", "repo_dir", type=click.Path(file_okay=False, exists=True),
                      help="Release repository (its fleet.db is the default database).")(fn)
    fn = click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
                      help="Fleet database: sqlite:///PATH or postgresql://...")(fn)
    return fn


def operator_option(fn: F) -> F:
    return click.option("--operator", envvar="EDGE_OPERATOR", show_envvar=True,
                        help="Name recorded in the audit log (default: the OS user).")(fn)


@click.group("rollout")
def rollout_group() -> None:
    """Staged rollouts: records the controller in 'edge-sdk serve' carries out
    (start, status, pause, resume, abort, list), or a one-shot 'run' from here."""


rollout_group.add_command(rollout_cmd, "run")


@rollout_group.command("start")
@db_options
@operator_option
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
              show_envvar=True, help="Fleet name (the {fleet} level of every topic).")
@click.option("--model", "models", multiple=True, required=True, metavar="NAME[=VERSION]",
              help="Released artifact name, with its version (default: the newest not "
                   "yanked; needs --repo). Repeatable: the models are deployed as one set.")
@click.option("--version", "version",
              help="Released version of the one --model NAME (default: the newest not "
                   "yanked; needs --repo).")
@click.option("--group", "groups", multiple=True,
              help="Devices the operator assigned to this group ('edge-sdk device set'). "
                   "Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="KEY[=VALUE]",
              help="Devices the operator gave this tag; hw.KEY[=VALUE] (hw.arch=aarch64) "
                   "narrows the selection to devices reporting that hardware fact. "
                   "Repeatable.")
@click.option("--device", "devices", multiple=True, help="Device id. Repeatable.")
@click.option("--waves", default="1,10%,50%,100%", show_default=True,
              help="Cumulative wave sizes: device counts or percentages.")
@click.option("--rate", default=0.0, show_default=True, type=float,
              help="Devices per minute (0: no limit).")
@click.option("--wave-timeout", default=600.0, show_default=True, type=float,
              help="Seconds a device may take to answer before it counts as silent.")
@click.option("--max-failure-rate", default=0.0, show_default=True, type=float,
              help="Abort when more than this share of finished devices failed or rolled "
                   "back.")
@click.option("--max-silent-rate", default=0.0, show_default=True, type=float,
              help="Abort when more than this share of finished devices did not answer.")
@click.option("--min-finished", default=1, show_default=True, type=click.IntRange(min=1),
              help="Finished devices needed before the abort criteria apply.")
@click.option("--pause-after-wave", is_flag=True,
              help="Hold after each wave until 'edge-sdk rollout resume'.")
@click.option("--no-rollback", is_flag=True, help="On abort, leave committed devices as is.")
@click.option("--rollback", "signed_rollback", is_flag=True,
              help="A rollback rollout: sign every wave as an explicit rollback, so that "
                   "devices on a newer version go back to --version (refused without it).")
@click.option("--gate", "gate", metavar="GATE",
              help="Shadow each device first and promote it only if its figures pass: "
                   "'agreement>=0.99 over 500 requests [within 30m] [sampling 0.25]' "
                   "(metrics: agreement, worst, latency_ratio, errors). A device that "
                   "fails counts as a failure for the abort criteria.")
@click.option("--gate-no-traffic", "gate_no_traffic", default="skip", show_default=True,
              metavar="fail|skip|promote",
              help="A gated device with too few compared requests within the time limit: "
                   "a failure, finished without the release, or promoted anyway.")
def start_cmd(db_url: str | None, repo_dir: str | None, operator: str | None, fleet: str,
              models: tuple[str, ...], version: str | None, groups: tuple[str, ...],
              tags: tuple[str, ...], devices: tuple[str, ...], waves: str, rate: float,
              wave_timeout: float, max_failure_rate: float, max_silent_rate: float,
              min_finished: int, pause_after_wave: bool, no_rollback: bool,
              signed_rollback: bool, gate: str | None, gate_no_traffic: str) -> None:
    """Record a rollout; the controller in 'edge-sdk serve' starts it within a second."""
    from ..release import Repository
    from ._db import require_fleet

    require_fleet()  # first: it names the [fleet] extra when it is missing
    from .. import fleet as fl
    from ..fleet._select import check_selector
    from ..quality import Gate

    RolloutSpec, actor_name, start_rollout = fl.RolloutSpec, fl.actor_name, fl.start_rollout

    # Refused before the database is opened: ids that cannot be topic levels, and values
    # no rollout runs with (the spec checks its own).
    selector = {"groups": groups, "tags": tags, "devices": devices}
    check_selector(fleet, selector)
    spec = RolloutSpec(waves=tuple(w.strip() for w in waves.split(",") if w.strip()),
                       rate=rate, wave_timeout=wave_timeout,
                       max_failure_rate=max_failure_rate, max_silent_rate=max_silent_rate,
                       min_finished=min_finished, pause_after_wave=pause_after_wave,
                       rollback=not no_rollback, signed_rollback=signed_rollback,
                       gate=None if gate is None else Gate.parse(gate),
                       gate_no_traffic=gate_no_traffic)
    repo = Repository(repo_dir) if repo_dir else None
    pairs: list[tuple[str, str]] = []
    for name, ver in parse_models(models, version):
        if repo is not None:
            ver = repo.find(name, ver).version
        elif ver is None:
            raise UsageError(f"name the version of {name} (--model {name}=VERSION, or --repo "
                             "to take the newest release)")
        pairs.append((name, ver))
    with fleet_db(db_url, repo_dir, fleet) as db:
        rid = start_rollout(db, fleet=fleet, models=pairs, selector=selector, spec=spec,
                            actor=actor_name(operator), repo=repo)
    what = "rollback rollout" if signed_rollback else "rollout"
    said = ", ".join(f"{n} {v}" for n, v in pairs)
    if spec.gate is not None:
        said += f" gated by '{spec.gate.text}' (no traffic: {gate_no_traffic})"
    click.echo(f"{what} {rid}: {said} recorded; 'edge-sdk serve' carries it out")


def _command(name: str) -> click.Command:
    @click.command(name)
    @click.argument("rollout_id", type=int)
    @db_options
    @operator_option
    def cmd(rollout_id: int, db_url: str | None, repo_dir: str | None,
            operator: str | None) -> None:
        with open_db(db_url, repo_dir) as db:
            from ..fleet import actor_name, command_rollout

            command_rollout(db, rollout_id, name, actor_name(operator))
        click.echo(f"rollout {rollout_id}: {name} requested")

    cmd.help = {"pause": "Hold a rollout: no more devices get it until resumed.",
                "resume": "Continue a paused rollout (also approves the next wave).",
                "approve": "Approve the next wave of a rollout held after a wave "
                           "(--pause-after-wave); refused for any other.",
                "abort": "Stop a rollout and send committed devices back."}[name]
    return cmd


for _name in ("pause", "resume", "abort", "approve"):
    rollout_group.add_command(_command(_name))


@rollout_group.command("status")
@click.argument("rollout_id", type=int)
@db_options
@click.option("--json", "as_json", is_flag=True)
def rollout_status_cmd(rollout_id: int, db_url: str | None, repo_dir: str | None,
                       as_json: bool) -> None:
    """Show a rollout: status, per-wave progress, each device and failure reasons."""
    from ..fleet._outcome import summary_text

    with open_db(db_url, repo_dir) as db:
        r = db.rollout(rollout_id)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    what = "rollback rollout" if r.get("rollback") else "rollout"
    said = ", ".join(f"{n} {v}" for n, v in r["models"])
    click.echo(f"{what} {r['id']}: {said} {r['status']} "
               f"(wave {r['wave']} of {r['waves']})" + (f": {r['reason']}" if r["reason"]
                                                         else ""))
    if r.get("gate"):
        click.echo(f"  gate: {r['gate']['text']} (no traffic: {r['gate']['no_traffic']})")
    for w in r["progress"]:  # the page shows the same summary (edge_sdk.fleet._outcome)
        shadow = f"; shadow: {summary_text(w['shadow'])}" if w.get("shadow") else ""
        click.echo(f"  wave {w['wave']}: {w['devices']} device(s): "
                   f"{summary_text(w['by_outcome'])}{shadow}")
    for d in r["devices"]:
        back = f"  rollback #{d['rollback_counter']} {d['rollback_status']}" \
            if d["rollback_status"] else ""
        click.echo(f"  {d['device']:<20} wave {d['wave']}  "
                   f"{d['outcome'].replace('_', ' '):<12} #{d['counter'] or '-'}{back}"
                   + (f"  {d['note']}" if d["note"] else ""))
        sh = d.get("shadow")
        if sh:
            click.echo(f"  {'':<20} shadow #{sh['counter'] or '-'} "
                       f"{(sh['verdict'] or sh['stage'] or 'under way').replace('_', ' ')}"
                       + (f": {sh['text']}" if sh["text"] else ""))


@rollout_group.command("list")
@db_options
@click.option("--json", "as_json", is_flag=True)
def rollout_list_cmd(db_url: str | None, repo_dir: str | None, as_json: bool) -> None:
    """List rollouts, newest first."""
    with open_db(db_url, repo_dir) as db:
        rows = db.rollouts()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no rollouts")
    for r in rows:
        done = sum(1 for d in r["devices"] if d["outcome"] == "committed")
        back = " (rollback)" if r.get("rollback") else ""
        click.echo(f"{r['id']:>4}  {r['fleet']:<10} {r['model']} {r['version']:<8}{back} "
                   f"{r['status']:<10} wave {r['wave']}/{r['waves']}  {done}/"
                   f"{len(r['devices'])} committed  by {r['created_by']}")


@click.command("audit")
@db_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
def audit_cmd(db_url: str | None, repo_dir: str | None, as_json: bool, limit: int) -> None:
    """Show the audit log: every operator action with time, actor and parameters."""
    with open_db(db_url, repo_dir) as db:
        rows = db.audit(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"]))
        click.echo(f"{when}  {r['actor']:<12} {r['action']:<16} "
                   f"{json.dumps(r['params'], sort_keys=True)}")


@click.group("device")
def device_group() -> None:
    """The operator's record of each device: the groups and tags rollouts select by
    (set), enrolment (pending, accept, reject, revoke, allow), and taking a device out
    of the registry (remove)."""


#: Devices listed one by one in the CLI's answer (the rest are counted).
_SHOWN = 20
#: Bytes an assignment file may have.
_FILE_MAX = 64 << 20


@device_group.command("set")
@click.argument("device_ids", nargs=-1)
@db_options
@operator_option
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
              show_envvar=True, help="Fleet name (the {fleet} level of every topic).")
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Devices one per line, DEVICE[:GROUP,...] [KEY=VALUE ...] (the ID:GROUP "
                   "of make_credentials.py --device); '-' reads stdin.")
@click.option("--group", "groups", multiple=True, help="Add this group. Repeatable.")
@click.option("--remove-group", "remove_groups", multiple=True, help="Drop this group.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Set this tag. Repeatable.")
@click.option("--remove-tag", "remove_tags", multiple=True, metavar="KEY",
              help="Drop this tag.")
@click.option("--replace", is_flag=True,
              help="Each device gets exactly the groups and tags given (others dropped).")
def device_set_cmd(device_ids: tuple[str, ...], db_url: str | None, repo_dir: str | None,
                   operator: str | None, fleet: str, file: str | None,
                   groups: tuple[str, ...], remove_groups: tuple[str, ...],
                   tags: tuple[str, ...], remove_tags: tuple[str, ...], replace: bool) -> None:
    """Assign groups and tags to DEVICE_IDS (and the devices of --file): what rollouts
    select by. A device's own report never does; one that has not reported yet is
    selected once it registers. One transaction, one audit entry."""
    from ._db import require_fleet

    require_fleet()

    from .. import fleet as fl
    change = fl.AssignmentChange.parse(groups=groups, remove_groups=remove_groups,
                                       tags=tags, remove_tags=remove_tags, replace=replace)
    changes = {d: change for d in device_ids}
    if file is not None:
        for d, ch in fl.parse_assignments(_read_file(file), file).items():
            changes[d] = ch.merged(change) if d in changes or not change.empty else ch
    with fleet_db(db_url, repo_dir, fleet) as db:
        # Before: once assigned, the devices make the fleet no longer empty.
        hint = other_fleets(db, fleet)
        res = fl.assign_devices(db, fleet=fleet, changes=changes,
                                actor=fl.actor_name(operator), source=file)
    for d in list(res.assignments)[:_SHOWN]:
        a = res.assignments[d]
        tag_text = " ".join(f"{k}={v}" for k, v in a["tags"].items())
        click.echo(f"  {d:<20} groups {','.join(a['groups']) or '-'}  tags {tag_text or '-'}")
    more = len(res.assignments) - _SHOWN
    click.echo((f"  ... and {more} more\n" if more > 0 else "")
               + f"{len(res.changed)} of {len(res.assignments)} device(s) changed in fleet "
               f"{fleet!r}" + (f"; {len(res.unregistered)} not registered yet (selected once "
                               "they report)" if res.unregistered else ""))
    if hint:
        click.echo(f"edge-sdk: warning: fleet {fleet!r} had no device before; {hint}",
                   err=True)


@device_group.command("remove")
@click.argument("device_ids", nargs=-1, required=True)
@db_options
@operator_option
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
              show_envvar=True, help="Fleet name (the {fleet} level of every topic).")
def device_remove_cmd(device_ids: tuple[str, ...], db_url: str | None, repo_dir: str | None,
                      operator: str | None, fleet: str) -> None:
    """Remove devices from the registry: their row, assignment and history. A device
    that reports again registers again, unassigned."""
    from ._db import require_fleet

    require_fleet()

    from .. import fleet as fl
    with fleet_db(db_url, repo_dir, fleet) as db:
        res = fl.remove_devices(db, fleet=fleet, device_ids=device_ids,
                                actor=fl.actor_name(operator))
    click.echo(f"removed {len(res.devices)} device(s) from fleet {fleet!r} "
               f"({res.events} history rows)")
    for d, rids in res.active_rollouts.items():
        click.echo(f"  {d} stays in running rollout(s) {', '.join(map(str, rids))} "
                   "(abort them to stop it being sent anything)", err=True)


# -- enrolment: device pending|accept|reject|revoke|allow, claim create|revoke|list ----------

def fleet_option(fn: F) -> F:
    return click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
                        show_envvar=True,
                        help="Fleet name (the {fleet} level of every topic).")(fn)


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _facts_text(facts: dict[str, str], width: int = 40) -> str:
    text = " ".join(f"{k}={v}" for k, v in sorted(facts.items())) or "-"
    return text if len(text) <= width else text[:width - 1] + "…"


def _tags(tags: tuple[str, ...]) -> dict[str, str]:
    from .. import fleet as fl

    return dict(fl.AssignmentChange.parse(tags=tags).set_tags)


@device_group.command("pending")
@db_options
@fleet_option
@click.option("--state", type=click.Choice(["pending", "accepted", "rejected", "revoked",
                                            "all"]),
              default="pending", show_default=True, help="Which enrolments to list.")
@click.option("--json", "as_json", is_flag=True)
def device_pending_cmd(db_url: str | None, repo_dir: str | None, fleet: str, state: str,
                       as_json: bool) -> None:
    """List the devices waiting to be accepted (enrolment requests), with the key
    fingerprint each came with and what it says about itself."""
    with open_db(db_url, repo_dir) as db:
        rows = db.enrolments(fleet, None if state == "all" else state)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no {'' if state == 'all' else state + ' '}enrolments in fleet {fleet!r}")
        return
    now = time.time()
    click.echo(f"{'DEVICE':<24} {'BATCH':<12} {'FINGERPRINT':<16} {'REQ':>4} {'CONFL':>5} "
               f"{'AGE':>5}  " + ("STATE     " if state == "all" else "") + "FACTS")
    for r in rows:
        click.echo(f"{r['device_id']:<24} {r['batch']:<12} {r['fingerprint'][:16]:<16} "
                   f"{r['requests']:>4} {r['conflicts']:>5} "
                   f"{_age(now - r['requested_at']):>5}  "
                   + (f"{r['state']:<10}" if state == "all" else "")
                   + _facts_text(r["facts"]))


@device_group.command("accept")
@click.argument("device_ids", nargs=-1, required=True)
@db_options
@operator_option
@fleet_option
@click.option("--group", "groups", multiple=True, help="Add this group. Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Set this tag. Repeatable.")
def device_accept_cmd(device_ids: tuple[str, ...], db_url: str | None, repo_dir: str | None,
                      operator: str | None, fleet: str, groups: tuple[str, ...],
                      tags: tuple[str, ...]) -> None:
    """Accept devices that asked to enrol (pending or rejected): the controller in
    'edge-sdk serve --enrol' issues their credentials. --group/--tag go into their
    assignment, as 'device set' does."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from ..fleet import _enrol

    tag_map = _tags(tags)
    with fleet_db(db_url, repo_dir, fleet) as db:
        done = _enrol.accept_devices(db, fleet, device_ids, groups=groups, tags=tag_map,
                                     actor=fl.actor_name(operator))
    same = sorted(set(device_ids) - set(done))
    click.echo(f"accepted {len(done)} device(s) in fleet {fleet!r}"
               + (f": {', '.join(done[:_SHOWN])}" if done else "")
               + (f"; already accepted: {', '.join(same[:_SHOWN])}" if same else ""))


@device_group.command("reject")
@click.argument("device_ids", nargs=-1, required=True)
@db_options
@operator_option
@fleet_option
@click.option("--reason", help="Sent to the device in its answer (one line).")
def device_reject_cmd(device_ids: tuple[str, ...], db_url: str | None, repo_dir: str | None,
                      operator: str | None, fleet: str, reason: str | None) -> None:
    """Reject devices that asked to enrol: they are answered 'rejected' (now and on
    every later request) until accepted."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from ..fleet import _enrol

    with fleet_db(db_url, repo_dir, fleet) as db:
        done = _enrol.reject_devices(db, fleet, device_ids, reason=reason,
                                     actor=fl.actor_name(operator))
    click.echo(f"rejected {len(done)} device(s) in fleet {fleet!r}"
               + (f": {', '.join(done[:_SHOWN])}" if done else ""))


#: How often ``device revoke`` looks for the controller's ``applied_at``.
_REVOKE_POLL_S = 0.1


@device_group.command("revoke")
@click.argument("device_id")
@db_options
@operator_option
@fleet_option
@click.option("--reason", required=True, help="Why (the audit log keeps it).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=10.0,
              show_default=True,
              help="Seconds to wait for the controller to close the device's connection.")
def device_revoke_cmd(device_id: str, db_url: str | None, repo_dir: str | None,
                      operator: str | None, fleet: str, reason: str, wait_s: float) -> None:
    """Revoke an accepted device: the controller deletes its broker account (closing its
    connection), rollouts leave it out, and it comes back only by asking again and being
    accepted. Waits for the controller to say it is done."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from ..fleet import _enrol

    with fleet_db(db_url, repo_dir, fleet) as db:
        _enrol.revoke_device(db, fleet, device_id, reason=reason,
                             actor=fl.actor_name(operator))
        start = time.monotonic()
        while True:
            row = _enrol.enrolment(db, fleet, device_id)
            if row is not None and row["applied_at"] is not None:
                click.echo(f"revoked {device_id}: the broker closed its connection "
                           f"({time.monotonic() - start:.1f} s)")
                return
            if time.monotonic() - start >= wait_s:
                break
            time.sleep(_REVOKE_POLL_S)
    click.echo(f"revoked {device_id} in the record; no controller applied it yet (is serve "
               "running?)")


@device_group.command("allow")
@click.argument("device_ids", nargs=-1)
@db_options
@operator_option
@fleet_option
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Devices one per line, DEVICE[:GROUP,...] [KEY=VALUE ...]; '-' reads "
                   "stdin.")
@click.option("--group", "groups", multiple=True, help="Add this group. Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Set this tag. Repeatable.")
def device_allow_cmd(device_ids: tuple[str, ...], db_url: str | None, repo_dir: str | None,
                     operator: str | None, fleet: str, file: str | None,
                     groups: tuple[str, ...], tags: tuple[str, ...]) -> None:
    """Accept devices before they ask: the first enrolment request of each is accepted
    with the groups and tags given. One that asked already is accepted now."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from ..fleet import _enrol

    change = fl.AssignmentChange.parse(groups=groups, tags=tags)
    changes = {d: change for d in device_ids}
    if file is not None:
        for d, ch in fl.parse_assignments(_read_file(file), file).items():
            changes[d] = ch.merged(change)
    if not changes:
        raise UsageError("name at least one device (or --file)")
    with fleet_db(db_url, repo_dir, fleet) as db:
        res = _enrol.allow_changes(db, fleet, changes, actor=fl.actor_name(operator),
                                   source=file)
    click.echo(f"allowed {len(res.listed)} device(s) in fleet {fleet!r} (accepted when they "
               "ask)" + (f"; accepted now: {', '.join(res.accepted[:_SHOWN])}"
                         if res.accepted else ""))


def _read_file(file: str) -> str:
    """The text of ``--file`` (``-``: stdin), bounded; one-line errors."""
    try:
        with click.open_file(file, "rb") as f:
            raw = f.read(_FILE_MAX + 1)
    except OSError as err:
        raise UsageError(f"--file {file}: cannot read it: {err.strerror or err}") from None
    if len(raw) > _FILE_MAX:
        raise UsageError(f"--file {file}: over {_FILE_MAX >> 20} MiB")
    try:
        return str(raw.decode())
    except UnicodeDecodeError:
        raise UsageError(f"--file {file}: not UTF-8 text") from None


@click.group("claim")
def claim_group() -> None:
    """Claim accounts: the broker account a batch of devices enrols with (create,
    revoke, list). The controller in 'edge-sdk serve --enrol' applies them."""


@claim_group.command("create")
@click.argument("batch")
@db_options
@operator_option
@fleet_option
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Write the password to this file (mode 0600) instead of printing it.")
@click.option("--sessions", type=int, default=16, show_default=True,
              help="Broker accounts of the claim (1-256), all with its password: each "
                   "device enrols through one of them, so that devices asking at once do "
                   "not close each other's connections.")
def claim_create_cmd(batch: str, db_url: str | None, repo_dir: str | None,
                     operator: str | None, fleet: str, out: str | None,
                     sessions: int) -> None:
    """Create the claim of BATCH (--sessions broker accounts sharing one password); the
    password is shown once (or written to --out): put it on the batch's devices
    ([identity] claim_password_file)."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from .._fs import atomic_write_text
    from ..fleet import _enrol

    if out is not None:
        _check_out(Path(out))
    with open_db(db_url, repo_dir) as db:
        password = _enrol.create_claim(db, fleet, batch, actor=fl.actor_name(operator),
                                       sessions=sessions)
        said = (f"claim {batch!r} of fleet {fleet!r} recorded: user "
                f"{_enrol.claim_user(batch)}"
                + (f" and {sessions - 1} more session account(s)" if sessions > 1 else ""))
        if out is not None:
            try:
                atomic_write_text(out, password + "\n")  # a new temp file: mode 0600
            except OSError as err:
                # The password exists nowhere else: a claim nobody can use is undone.
                _enrol.revoke_claim(db, fleet, batch, actor=fl.actor_name(operator))
                raise UsageError(f"--out {out}: cannot write it ({err.strerror or err}); "
                                 f"claim {batch!r} not created") from None
            click.echo(f"{said}, password in {out}")
            return
    click.echo(f"{said}, password (shown once):")
    click.echo(password)


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that would overwrite a file (another claim's password, say) or
    that cannot be written, before anything is recorded."""
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: directory {parent} does not exist")
    if out.exists() or out.is_symlink():
        raise UsageError(f"--out {out}: exists (it may hold another claim's password): "
                         "remove it or name another file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: directory {parent} is not writable")


@claim_group.command("revoke")
@click.argument("batch")
@db_options
@operator_option
@fleet_option
def claim_revoke_cmd(batch: str, db_url: str | None, repo_dir: str | None,
                     operator: str | None, fleet: str) -> None:
    """Revoke the claim account of BATCH (the controller deletes it at the broker); its
    pending requests are dropped. Devices enrolled with it keep their own accounts."""
    from ._db import require_fleet

    require_fleet()
    from .. import fleet as fl
    from ..fleet import _enrol

    with open_db(db_url, repo_dir) as db:
        dropped = _enrol.revoke_claim(db, fleet, batch, actor=fl.actor_name(operator))
    click.echo(f"claim {batch!r} of fleet {fleet!r} revoked; {dropped} pending request(s) "
               "dropped")


@claim_group.command("list")
@db_options
@fleet_option
@click.option("--json", "as_json", is_flag=True)
def claim_list_cmd(db_url: str | None, repo_dir: str | None, fleet: str,
                   as_json: bool) -> None:
    """List the claims with the controller's counts of their requests."""
    with open_db(db_url, repo_dir) as db:
        rows = db.claims(fleet)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no claims in fleet {fleet!r}")
        return
    click.echo(f"{'BATCH':<16} {'STATE':<10} {'SESSIONS':>8} {'REQUESTS':>8} {'DROPPED':>8} "
               f"{'REFUSED':>8}  CREATED BY")
    for r in rows:
        st = "revoked" if r["revoked_at"] is not None else (
            "applying" if r["want"] else "active")
        click.echo(f"{r['batch']:<16} {st:<10} {r['sessions']:>8} {r['requests']:>8} "
                   f"{r['dropped']:>8} {r['refused']:>8}  {r['created_by']}")


__all__ = ["audit_cmd", "claim_group", "device_group", "rollout_group"]
