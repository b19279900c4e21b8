"""``rollout start|status|pause|resume|abort|list|run`` and ``audit``: thin wrappers over
edge_sdk.fleet. The CLI writes rollout records and commands to the fleet database; the
controller inside ``edge-sdk serve`` carries them out (the database is the authority)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ._db import open_db
from ._release import rollout_cmd

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
@click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET")
@click.option("--model", required=True, help="Released artifact name.")
@click.option("--version", "version", help="Released version (default: the newest; needs "
              "--repo).")
@click.option("--group", "groups", multiple=True, help="Device group. Repeatable.")
@click.option("--tag", "tags", multiple=True, metavar="KEY[=VALUE]",
              help="Device tag or hardware fact (arch=aarch64). Repeatable.")
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
def start_cmd(db_url: str | None, repo_dir: str | None, operator: str | None, fleet: str,
              model: str, version: str | None, groups: tuple[str, ...],
              tags: tuple[str, ...], devices: tuple[str, ...], waves: str, rate: float,
              wave_timeout: float, max_failure_rate: float, max_silent_rate: float,
              min_finished: int, pause_after_wave: bool, no_rollback: bool) -> None:
    """Record a rollout; the controller in 'edge-sdk serve' starts it within a second."""
    from ..release import Repository, plan_waves
    from ._db import fleet_module

    fl = fleet_module()
    RolloutSpec, actor_name, start_rollout = fl.RolloutSpec, fl.actor_name, fl.start_rollout

    from ..transport import Topics

    topics = Topics(fleet)  # fleet, device and group ids become topic levels: checked first
    for d in devices:
        topics.device(d)
    for g in groups:
        topics.group_desired(g)
    wave_list = tuple(w.strip() for w in waves.split(",") if w.strip())
    plan_waves(["x"], wave_list)  # checks the wave syntax before anything is written
    if wave_timeout <= 0 or rate < 0:
        raise UsageError("--wave-timeout must be > 0 and --rate >= 0")
    for name, v in (("--max-failure-rate", max_failure_rate),
                    ("--max-silent-rate", max_silent_rate)):
        if not 0 <= v < 1:
            raise UsageError(f"{name} must be in [0, 1)")
    repo = Repository(repo_dir) if repo_dir else None
    if repo is not None:
        version = repo.find(model, version).version
    elif version is None:
        raise UsageError("name --version (or --repo to take the newest release)")
    spec = RolloutSpec(waves=wave_list, rate=rate, wave_timeout=wave_timeout,
                       max_failure_rate=max_failure_rate, max_silent_rate=max_silent_rate,
                       min_finished=min_finished, pause_after_wave=pause_after_wave,
                       rollback=not no_rollback)
    with open_db(db_url, repo_dir) as db:
        rid = start_rollout(db, fleet=fleet, model=model, version=version,
                            selector={"groups": groups, "tags": tags, "devices": devices},
                            spec=spec, actor=actor_name(operator), repo=repo)
    click.echo(f"rollout {rid}: {model} {version} recorded; 'edge-sdk serve' carries it out")


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
                "abort": "Stop a rollout and send committed devices back."}[name]
    return cmd


for _name in ("pause", "resume", "abort"):
    rollout_group.add_command(_command(_name))


@rollout_group.command("status")
@click.argument("rollout_id", type=int)
@db_options
@click.option("--json", "as_json", is_flag=True)
def rollout_status_cmd(rollout_id: int, db_url: str | None, repo_dir: str | None,
                       as_json: bool) -> None:
    """Show a rollout: status, per-wave progress, each device and failure reasons."""
    with open_db(db_url, repo_dir) as db:
        r = db.rollout(rollout_id)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"rollout {r['id']}: {r['model']} {r['version']} {r['status']} "
               f"(wave {r['wave']} of {r['waves']})" + (f": {r['reason']}" if r["reason"]
                                                         else ""))
    for w in r["progress"]:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(w["by_status"].items()))
        click.echo(f"  wave {w['wave']}: {w['devices']} device(s): {counts}")
    for d in r["devices"]:
        back = f"  rollback #{d['rollback_counter']} {d['rollback_status']}" \
            if d["rollback_status"] else ""
        click.echo(f"  {d['device']:<20} wave {d['wave']}  {d['status']:<10} "
                   f"#{d['counter'] or '-'}{back}" + (f"  {d['reason']}" if d["reason"] else ""))


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
        done = sum(1 for d in r["devices"] if d["status"] == "committed")
        click.echo(f"{r['id']:>4}  {r['fleet']:<10} {r['model']} {r['version']:<8} "
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


__all__ = ["audit_cmd", "rollout_group"]
