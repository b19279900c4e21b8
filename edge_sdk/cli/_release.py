"""``release``, ``deploy``, ``rollout``, ``status``, ``serve`` and ``pull``: thin wrappers
over edge_sdk.release, edge_sdk.trust and edge_sdk.transport."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from .._artifact import Artifact
from .._redact import redact_url
from .._settings import numeric_settings
from ..errors import DeploymentError, EdgeError, UsageError
from ..release import (
    DEFAULT_DELTA_BASES,
    DEPLOYMENT_EXPIRES_DAYS,
    ROLE_NAMES,
    DeploymentWatch,
    Repository,
    RolloutConfig,
    create_deployment,
    describe_transfer,
    fleet_status,
    previous_versions,
    publish_deployment,
    require_success,
    rollout,
)
from ..transport import (
    DeviceLimits,
    FetchConfig,
    MqttConfig,
    MqttConnection,
    RepoResponder,
    ResponderConfig,
    Topics,
)
from ..trust import Deployment, LocalModel, UpdateClient

F = TypeVar("F", bound=Callable[..., Any])


def _audit_options(fn: F) -> F:
    fn = click.option("--operator", envvar="EDGE_OPERATOR", show_envvar=True,
                      help="Name recorded in the audit log (default: the OS user).")(fn)
    return click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
                        help="Fleet database for the audit log and the devices assigned to "
                             "groups (default: REPO/fleet.db).")(fn)


def _audit(db_url: str | None, repo: str, operator: str | None, action: str,
           params: dict[str, Any]) -> None:
    from ._db import record

    record(db_url, repo, operator, action, params)


def _mqtt_options(fn: F) -> F:
    return _mqtt_options_required(True)(fn)


def _mqtt_options_required(required: bool) -> Callable[[F], F]:
    return lambda fn: _mqtt_options_impl(fn, required)


def _mqtt_options_impl(fn: F, required: bool) -> F:
    opts = [
        click.option("--broker", required=required, envvar="EDGE_BROKER", show_envvar=True,
                     help="Broker URL: mqtt://HOST:PORT or mqtts://HOST:PORT; for a "
                          "clustered broker, its nodes comma-separated (tried in turn)."),
        click.option("--fleet", default="default", show_default=True, envvar="EDGE_FLEET",
                     show_envvar=True,
                     help="Fleet name (the {fleet} level of every topic)."),
        click.option("--topic-prefix", default="edge", show_default=True, hidden=True),
        click.option("--username", envvar="EDGE_MQTT_USERNAME", help="Broker user name."),
        click.option("--password", envvar="EDGE_MQTT_PASSWORD", show_envvar=True,
                     help="Broker password (prefer the environment variable)."),
        click.option("--ca-file", type=click.Path(dir_okay=False), help="TLS CA bundle."),
        click.option("--cert-file", type=click.Path(dir_okay=False),
                     help="TLS client certificate."),
        click.option("--key-file", type=click.Path(dir_okay=False), help="TLS client key."),
        click.option("--client-id", default="", help="MQTT client id (default: random)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _mqtt_config(kw: dict[str, Any]) -> MqttConfig:
    return MqttConfig(
        url=kw.pop("broker"), fleet=kw.pop("fleet"), topic_prefix=kw.pop("topic_prefix"),
        username=kw.pop("username"), password=kw.pop("password"), ca_file=kw.pop("ca_file"),
        cert_file=kw.pop("cert_file"), key_file=kw.pop("key_file"),
        client_id=kw.pop("client_id"))


def _pairs(values: tuple[str, ...], what: str) -> dict[str, int]:
    out = {}
    for v in values:
        role, sep, num = v.partition("=")
        if not sep or not num.strip().isdigit():
            raise UsageError(f"{what} {v!r} must look like ROLE=N (e.g. targets=2)")
        out[role.strip()] = int(num)
    return out


@click.group("release")
def release_group() -> None:
    """Manage the signed (TUF) release repository."""


def _durations(values: tuple[str, ...]) -> dict[str, timedelta]:
    from ..release import parse_duration

    out = {}
    for v in values:
        role, sep, text = v.partition("=")
        if not sep or not role.strip():
            raise UsageError(f"--expires {v!r}: expected ROLE=DURATION (e.g. timestamp=2m)")
        out[role.strip()] = parse_duration(text, f"--expires {v!r}")
    return out


@release_group.command("init")
@click.argument("repo", type=click.Path(file_okay=False))
@click.option("--keys", "keydir", required=True, type=click.Path(file_okay=False),
              help="Directory for the private keys (created; must be outside REPO).")
@click.option("--threshold", multiple=True, metavar="ROLE=N",
              help="Signatures needed for ROLE (that many keys are generated). Repeatable.")
@click.option("--expires", multiple=True, metavar="ROLE=DURATION",
              help="Lifetime of ROLE's metadata: 90s, 2m, 12h, 7d (a bare number is days; "
                   "defaults root=365d, targets=90d, snapshot=7d, timestamp=1d). serve "
                   "re-signs the roles whose keys it holds once half of it has passed. "
                   "Repeatable.")
def init_cmd(repo: str, keydir: str, threshold: tuple[str, ...],
             expires: tuple[str, ...]) -> None:
    """Create a TUF repository in REPO with fresh ed25519 keys in KEYDIR."""
    r = Repository.init(repo, keydir, thresholds=_pairs(threshold, "--threshold"),
                        expires=_durations(expires))
    click.echo(f"created release repository {r.path} (keys in {keydir})")
    click.echo(f"device trust anchor:   {r.root_path}")
    click.echo(f"deployment public key: {r.deployment_key_path}")


@release_group.command("add")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("artifact_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory (default: the one given to init).")
@click.option("--delta-bases", type=click.IntRange(min=0), default=DEFAULT_DELTA_BASES,
              show_default=True,
              help="Also sign deltas from this many earlier versions of the model (0: none).")
@_audit_options
def add_cmd(repo: str, artifact_dir: str, keydir: str | None, delta_bases: int,
            db_url: str | None, operator: str | None) -> None:
    """Release ARTIFACT_DIR: sign it into the targets, bump snapshot and timestamp."""
    r = Repository(repo, keydir)
    rt = r.add_artifact(artifact_dir, delta_bases=delta_bases)
    _audit(db_url, repo, operator, "release.add", {
        "repo": str(r.path), "model": rt.name, "version": rt.version, "sha256": rt.sha256,
        "length": rt.length})
    v = r.versions()
    click.echo(f"released {rt.name} {rt.version}: {rt.path} ({rt.length} bytes, sha256 "
               f"{rt.sha256[:16]}…); targets v{v['targets']}, timestamp v{v['timestamp']}")
    for note in r.delta_notes:
        click.echo(f"  {note}")
    _say_orphans(r)


@release_group.command("list")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(repo: str, as_json: bool) -> None:
    """List released artifacts and the metadata versions and expiries."""
    r = Repository(repo)
    targets = r.targets()
    roles = {role: {"version": r.load(role).signed.version,
                    "expires": r.load(role).signed.expires.isoformat()}
             for role in ROLE_NAMES}
    if as_json:
        click.echo(json.dumps({"targets": [t.to_json() for t in targets], "roles": roles},
                              indent=2))
        return
    for role, info in roles.items():
        click.echo(f"{role:<9} v{info['version']:<4} expires {info['expires']}")
    if not targets:
        click.echo("no releases yet")
    for t in targets:
        gone = f"  YANKED{': ' + t.yank_reason if t.yank_reason else ''}" if t.yanked else ""
        click.echo(f"{t.name} {t.version}  {t.length} bytes  sha256 {t.sha256[:16]}…  {t.path}"
                   + gone)
        for d in t.deltas:
            click.echo(f"  delta from {d.base_version}: {d.length} bytes "
                       f"({d.length / max(1, t.length):.1%})")


@release_group.command("yank")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("name")
@click.argument("version")
@click.option("--reason", help="Why (shown by 'release list', the page and refusals).")
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory holding the targets key (default: the one given to init).")
@_audit_options
def yank_cmd(repo: str, name: str, version: str, reason: str | None, keydir: str | None,
             db_url: str | None, operator: str | None) -> None:
    """Retire release NAME VERSION: signed as yanked in the targets metadata, so that no
    deploy, rollout or pull picks it; devices running it keep it until told otherwise."""
    r = Repository(repo, keydir)
    rt = r.yank(name, version, reason)
    _audit(db_url, repo, operator, "release.yank", {
        "repo": str(r.path), "model": rt.name, "version": rt.version, "reason": reason})
    click.echo(f"yanked {rt.name} {rt.version}" + (f" ({reason})" if reason else "")
               + f"; targets v{r.versions()['targets']}, timestamp v{r.versions()['timestamp']}")


@release_group.command("unyank")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("name")
@click.argument("version")
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory holding the targets key (default: the one given to init).")
@_audit_options
def unyank_cmd(repo: str, name: str, version: str, keydir: str | None, db_url: str | None,
               operator: str | None) -> None:
    """Undo a yank of release NAME VERSION (signed like the yank)."""
    r = Repository(repo, keydir)
    rt = r.unyank(name, version)
    _audit(db_url, repo, operator, "release.unyank", {
        "repo": str(r.path), "model": rt.name, "version": rt.version})
    click.echo(f"unyanked {rt.name} {rt.version}; targets v{r.versions()['targets']}")


@release_group.command("refresh")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.option("--keys", "keydir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Also re-sign root and targets now.")
def refresh_cmd(repo: str, keydir: str | None, force: bool) -> None:
    """Re-sign timestamp and snapshot (and anything near expiry). Run it from cron."""
    r = Repository(repo, keydir)
    roles = r.refresh(force=force)
    _say_orphans(r)
    click.echo(f"re-signed {', '.join(roles)}; timestamp v{r.versions()['timestamp']}")


def _say_orphans(r: Repository) -> None:
    if r.orphans_removed:
        click.echo(f"removed the profiling targets of {len(r.orphans_removed)} run(s) no "
                   f"live process owns: {', '.join(x[:12] for x in r.orphans_removed)}")


@release_group.command("rotate-key")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.argument("role", type=click.Choice(ROLE_NAMES))
@click.option("--keys", "keydir", type=click.Path(file_okay=False))
@_audit_options
def rotate_cmd(repo: str, role: str, keydir: str | None, db_url: str | None,
               operator: str | None) -> None:
    """Replace ROLE's keys with a new root signed by old and new root keys."""
    r = Repository(repo, keydir)
    ids = r.rotate_key(role)
    _audit(db_url, repo, operator, "release.rotate-key", {"repo": str(r.path), "role": role,
                                                          "keyids": list(ids)})
    click.echo(f"rotated {role} to key {', '.join(i[:16] for i in ids)}; root "
               f"v{r.versions()['root']}")


@click.command("deploy")
@click.option("--repo", required=True, type=click.Path(file_okay=False, exists=True),
              help="Release repository.")
@click.option("--device", "devices", multiple=True, help="Device id. Repeatable.")
@click.option("--group", "groups", multiple=True, help="Device group. Repeatable.")
@click.option("--model", "models", multiple=True, metavar="NAME[=VERSION]",
              help="Released artifact name, with its version (default: the newest not "
                   "yanked; with --rollback: the one deployed before). Repeatable: the "
                   "models are signed as one set, installed and rolled back together.")
@click.option("--version", "version",
              help="Released version of the one --model NAME (default: the newest not "
                   "yanked).")
@click.option("--remove", "remove", multiple=True, metavar="NAME",
              help="Remove this model from the devices (a signed removal). Repeatable.")
@click.option("--rollback", is_flag=True,
              help="Sign an explicit downgrade: each --model NAME without a version goes "
                   "back to the version deployed before the last one.")
@click.option("--expires-days", default=DEPLOYMENT_EXPIRES_DAYS, show_default=True,
              type=float, help="Lifetime of the deployment document.")
@click.option("--keys", "keydir", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Also write the signed document to this file.")
@click.option("--wait", is_flag=True,
              help="Follow the devices' reports until each one committed or failed; exit 3 "
                   "unless all committed.")
@click.option("--timeout", default=600.0, show_default=True, type=float,
              help="With --wait: seconds to wait for the devices.")
@_audit_options
@_mqtt_options
def deploy_cmd(repo: str, devices: tuple[str, ...], groups: tuple[str, ...],
               models: tuple[str, ...], version: str | None, remove: tuple[str, ...],
               rollback: bool, expires_days: float, keydir: str | None,
               output: str | None, wait: bool, timeout: float, db_url: str | None,
               operator: str | None, **mqtt: Any) -> None:
    """Sign a deployment and publish it retained on each device's or group's desired topic.

    One --model, several (a set, signed as one document), --remove, or both; models the
    deployment does not name are left as they are on the devices."""
    if timeout <= 0:
        raise UsageError("--timeout must be > 0 seconds")
    wanted = parse_models(models, version)
    if not wanted and not remove:
        raise UsageError("name a --model to deploy or a --remove")
    config = _mqtt_config(mqtt)
    names = Topics.for_config(config)
    for d in devices:
        names.device(d)  # a bad id is a one-line error before anything connects
    for g in groups:
        names.group_desired(g)
    r = Repository(repo, keydir)
    # Whom --wait follows in a group: the devices the operator assigned to it, never the
    # ones that only say so in their own state.
    members, hint = _group_members(db_url, repo, config.fleet, groups) if wait and groups \
        else ({}, "")
    if rollback and any(v is None for _, v in wanted):
        before = previous_versions(r, [n for n, v in wanted if v is None], devices=devices,
                                   groups=groups)
        wanted = [(n, v or before[n]) for n, v in wanted]
    with MqttConnection(config, name="edge-deploy") as conn:
        signed = create_deployment(r, models=wanted, remove=remove, fleet=config.fleet,
                                   devices=devices, groups=groups, rollback=rollback,
                                   expires_days=expires_days)
        if output:
            from .._fs import atomic_write_bytes

            atomic_write_bytes(output, signed.document)
        counter = signed.deployment.counter
        # Subscribed before publishing, so no report can come before we listen.
        watch = DeploymentWatch(conn, counter, devices=devices,
                                members={d for ids in members.values() for d in ids},
                                progress=_show_progress, document=signed.document,
                                groups=groups) if wait else None
        try:
            topics = publish_deployment(conn, signed)
            click.echo(f"deployed {signed.deployment.describe()} on {', '.join(topics)}")
            _audit(db_url, repo, operator, "deploy", {
                "fleet": config.fleet, **_audited_models(signed.deployment),
                "counter": counter,
                "devices": list(devices), "groups": list(groups), "rollback": rollback})
            if watch is None:
                return
            if members and not devices and not any(members.values()):
                raise DeploymentError(f"{_unassigned(list(members), config.fleet, hint)}; "
                                      "nothing to wait for")
            outcomes = watch.wait(
                timeout, notice=lambda line: click.echo(f"  warning: {line}", err=True))
        finally:
            if watch is not None:
                watch.close()
    for o in outcomes:
        click.echo(f"  {o.device:<20} {o.result:<12} {o.model or '-'}"
                   + (f"  {o.reason}" if o.reason and not o.ok else ""))
    require_success(outcomes, counter)
    click.echo(f"deployment {counter} committed on all {len(outcomes)} device(s)")


def parse_models(specs: Sequence[str], version: str | None = None,
                 ) -> list[tuple[str, str | None]]:
    """``--model NAME[=VERSION]`` options as ``(name, version or None)``; ``version``
    (``--version``) belongs to the one ``--model NAME`` without its own. Raises
    :class:`UsageError` (one line)."""
    out: list[tuple[str, str | None]] = []
    for spec in specs:
        name, sep, ver = spec.partition("=")
        if not name.strip() or (sep and not ver.strip()):
            raise UsageError(f"--model {spec!r} must look like NAME or NAME=VERSION")
        out.append((name.strip(), ver.strip() if sep else None))
    if version is not None:
        if len(out) != 1 or out[0][1] is not None:
            raise UsageError("--version goes with one --model NAME; for several models "
                             "give each its own: --model NAME=VERSION")
        out = [(out[0][0], version)]
    return out


def _group_members(db_url: str | None, repo: str, fleet: str,
                   groups: tuple[str, ...]) -> tuple[dict[str, list[str]], str]:
    """Each group's devices as the operator assigned them ('edge-sdk device set'), from
    the fleet database (--db, else the repository's fleet.db); and, when there are none,
    the other fleets the database holds (:func:`._db.other_fleets`)."""
    from ._db import open_db, other_fleets

    with open_db(db_url, repo) as db:
        found = {g: [d["id"] for d in db.devices(fleet=fleet, group=g)] for g in groups}
        return found, ("" if any(found.values()) else other_fleets(db, fleet))


def _unassigned(groups: list[str], fleet: str, hint: str) -> str:
    return (f"no device is assigned to group(s) {', '.join(groups)} in fleet {fleet!r} "
            "(a device's own report of its groups does not count: assign devices with "
            "'edge-sdk device set DEVICE... --group G')" + (f"; {hint}" if hint else ""))


def _show_progress(device: str, event: dict[str, Any]) -> None:
    if event.get("event") == "progress":
        click.echo(f"  {device}: {describe_transfer(event)}", err=True)
        return
    model, dep = event.get("model"), event.get("deployment")
    what = (f" {model.get('name')} {model.get('version')}" if isinstance(model, dict) else
            f" {dep.get('name')} {dep.get('artifact_version')}" if isinstance(dep, dict) else "")
    reason = f": {event['reason']}" if event.get("reason") else ""
    got = event.get("download")
    if isinstance(got, dict) and isinstance(got.get("message"), str):
        reason = f": {got['message'][:300]}"
    click.echo(f"  {device}: {event.get('event')}{what}{reason}", err=True)


@click.command("rollout")
@click.option("--repo", required=True, type=click.Path(file_okay=False, exists=True),
              help="Release repository.")
@click.option("--device", "devices", multiple=True, help="Device id. Repeatable.")
@click.option("--group", "groups", multiple=True,
              help="Device group: the devices assigned to it ('edge-sdk device set') that "
                   "have reported. Repeatable.")
@click.option("--model", "models", multiple=True, required=True, metavar="NAME[=VERSION]",
              help="Released artifact name, with its version (default: the newest not "
                   "yanked). Repeatable: the models are deployed as one set.")
@click.option("--version", "version",
              help="Released version of the one --model NAME (default: the newest not "
                   "yanked).")
@click.option("--waves", default=",".join(RolloutConfig.waves), show_default=True,
              help="Cumulative wave sizes: device counts or percentages.")
@click.option("--max-failures", default=RolloutConfig.max_failures, show_default=True,
              type=float,
              help="Devices the rollout may lose before it aborts, over every wave so "
                   "far: a count (>= 1) or a share of the finished devices (< 1); failed "
                   "and silent ones are each held to it ('rollout start''s rule).")
@click.option("--wave-timeout", default=RolloutConfig.wave_timeout, show_default=True,
              type=float,
              help="Seconds each wave may take.")
@click.option("--no-rollback", is_flag=True,
              help="On abort, leave the devices that committed on the new release.")
@click.option("--rollback", "signed_rollback", is_flag=True,
              help="A rollback rollout: sign every wave as an explicit rollback, so that "
                   "devices on a newer version go back to --version (refused without it).")
@click.option("--keys", "keydir", type=click.Path(file_okay=False))
@_audit_options
@_mqtt_options
def rollout_cmd(repo: str, devices: tuple[str, ...], groups: tuple[str, ...],
                db_url: str | None, models: tuple[str, ...], version: str | None, waves: str,
                max_failures: float, wave_timeout: float, no_rollback: bool,
                signed_rollback: bool, keydir: str | None, operator: str | None,
                **mqtt: Any) -> None:
    """Deploy in growing waves; abort when a wave fails and send the devices back.

    Exit 0 when every wave committed, 3 when the rollout aborted."""
    cfg = RolloutConfig(waves=tuple(w for w in waves.split(",") if w.strip()),
                        max_failures=max_failures, wave_timeout=wave_timeout,
                        rollback=not no_rollback, signed_rollback=signed_rollback)
    wanted = parse_models(models, version)
    config = _mqtt_config(mqtt)
    r = Repository(repo, keydir)
    found, hint = _group_members(db_url, repo, config.fleet, groups) if groups else ({}, "")
    empty = [g for g, ids in found.items() if not ids]
    if empty:
        raise UsageError(_unassigned(empty, config.fleet, hint))
    sent: dict[str, Any] = {"version": wanted[0][1], "deployments": [], "rollbacks": []}

    def on_wave(kind: str, info: dict[str, Any]) -> None:
        if info["event"] == "start":
            sent["rollbacks" if info["rollback"] else "deployments"].append(info["counter"])
            if not info["rollback"]:
                sent["version"] = info["version"]  # the one --version or the newest named
                if len(wanted) > 1:
                    sent["models"] = dict(info["models"])
        _show_wave(kind, info)

    def audit(aborted: str | None) -> None:
        _audit(db_url, repo, operator, "rollout.run", {
            "fleet": config.fleet, "model": wanted[0][0], "devices": list(devices),
            "groups": list(groups), "waves": list(cfg.waves),
            "max_failures": cfg.max_failures, "wave_timeout": cfg.wave_timeout,
            "rollback": cfg.rollback, "signed_rollback": cfg.signed_rollback, **sent,
            "aborted": aborted})

    try:
        with MqttConnection(config, name="edge-rollout") as conn:
            result = rollout(r, conn, models=wanted, devices=devices,
                             members=sorted({d for ids in found.values() for d in ids}),
                             config=cfg, progress=_show_progress, on_wave=on_wave)
    except BaseException as err:
        # Refused before any wave: nothing happened, no entry. Cut short after one went
        # out: devices were told to update, so it is recorded, without hiding why.
        if sent["deployments"]:
            try:
                audit(f"interrupted: {str(err) or type(err).__name__}")
            except Exception as audit_err:
                click.echo(f"edge-sdk: warning: not recorded in the audit log: {audit_err}",
                           err=True)
        raise
    audit(result.aborted)
    said = ", ".join(f"{n} {v}" for n, v in result.models.items())
    click.echo(f"rollout of {said}: "
               f"{sum(len(w.devices) for w in result.waves)} of "
               f"{sum(len(w) for w in result.planned)} device(s) in "
               f"{len(result.waves)} of {len(result.planned)} wave(s)")
    for w in result.waves:
        for o in w.outcomes:
            click.echo(f"  wave {w.index}  {o.device:<20} {o.result:<12} {o.model or '-'}")
    for o in result.rolled_back:
        click.echo(f"  rollback {o.device:<20} {o.result:<12} {o.model or '-'}")
    for d, why in result.not_rolled_back.items():
        click.echo(f"  rollback {d:<20} skipped      {why}")
    for d in result.left_out:
        click.echo(f"  left out {d:<20} assigned to the group, has never reported")
    if result.aborted is not None:
        back = sum(o.ok for o in result.rolled_back)
        tail = (f"; {back} device(s) sent back to their previous release"
                if not no_rollback else "; no rollback (--no-rollback)")
        raise DeploymentError(f"rollout of {result.model} {result.version} aborted in "
                              f"{result.aborted}{tail}")
    click.echo(f"rollout of {result.model} {result.version} committed on every device")


def _show_wave(_: str, info: dict[str, Any]) -> None:
    what = "rollback" if info["rollback"] else "wave"
    if info["event"] == "start":
        got = info.get("models") or []
        said = (", ".join([*(f"{n} {v}" for n, v in got),
                           *(f"remove {n}" for n in info.get("remove", []))])
                if len(got) != 1 or info.get("remove") else info["version"])
        click.echo(f"{what} {info['index']}: deployment #{info['counter']} of "
                   f"{said} to {len(info['devices'])} device(s): "
                   f"{', '.join(info['devices'])}", err=True)
    else:
        click.echo(f"{what} {info['index']}: {info['committed']} committed, "
                   f"{info['failed']} did not", err=True)


@click.command("status")
@click.option("--device", "devices", multiple=True, help="Only this device. Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw states as JSON.")
@click.option("--drifting", is_flag=True,
              help="Only the devices whose inputs drifted from the evaluation set (needs "
                   "--db or --repo: the registry judges drift).")
@click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
              help="Read the fleet database (the registry) instead of the broker.")
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, exists=True),
              help="Read the registry in REPO/fleet.db instead of the broker (or --db), and "
                   "warn about REPO's metadata that expires within a day with no online "
                   "key to re-sign it.")
@_mqtt_options_required(False)
def status_cmd(devices: tuple[str, ...], as_json: bool, db_url: str | None,
               repo_dir: str | None, drifting: bool = False, **mqtt: Any) -> None:
    """Show every device's reported state: online, models (each with its version, and
    "(trial)" while in its health window), previous model, last update.
    From the fleet database also the groups the operator assigned, and where a device's
    report differs from them."""
    assigned: dict[str, dict[str, Any]] = {}
    silent: set[str] = set()
    enrolments: list[dict[str, Any]] = []
    if drifting and not (db_url or repo_dir):
        raise UsageError("--drifting reads the registry's judgement: add --db URL or "
                         "--repo REPO")
    if repo_dir:
        from ..release import expiry_warnings

        for w in expiry_warnings(Repository(repo_dir)):
            click.echo(f"! {w.message}", err=True)
    if db_url or repo_dir:
        from ..release._watch import DeviceStatus
        from ._db import open_db, other_fleets

        fleet = mqtt["fleet"]
        with open_db(db_url, repo_dir) as db:
            registered = db.devices(fleet=fleet, drifting=True if drifting else None)
            hint = "" if registered else other_fleets(db, fleet)  # a missing --fleet, most often
            where = redact_url(db.url) + (f"; {hint}" if hint else "")
            counts = db.registry_stats(fleet=fleet)
            noisy = db.ingest_stats(fleet=fleet, limit=5)
            enrolments = db.enrolments(fleet)
        _say_registry(counts, noisy)
        states = {}
        for row in registered:
            st = DeviceStatus.parse(row["id"], json.dumps(row["state"]).encode())
            if st is not None:
                raw = st.raw if row["offline_since"] is None \
                    else {**st.raw, "offline_since": row["offline_since"]}
                if row["revoked"] is not None:
                    raw = {**raw, "revoked": row["revoked"]}
                raw = {**raw, "drift": row["drift"]}  # the registry's, not the device's
                states[row["id"]] = dataclasses.replace(st, ts=row["last_seen"],
                                                        online=row["online"], raw=raw)
                assigned[row["id"]] = row
                if row["silent"]:
                    silent.add(row["id"])
    else:
        if not mqtt.get("broker"):
            raise UsageError("name the broker (--broker URL or EDGE_BROKER), or read the "
                             "registry with --db URL / --repo REPO")
        config = _mqtt_config(mqtt)
        fleet, where = config.fleet, redact_url(config.url)
        with MqttConnection(config, name="edge-status") as conn:
            states = fleet_status(conn)
    if devices:
        missing = [d for d in devices if d not in states]
        if missing:
            raise UsageError(f"no state reported by device(s) {', '.join(missing)} in fleet "
                             f"{fleet!r} on {where}")
        states = {d: states[d] for d in devices}
    if as_json:
        click.echo(json.dumps({d: s.raw for d, s in states.items()}, indent=2))
        return
    if not states and drifting:
        click.echo(f"no device's inputs are drifting in fleet {fleet!r} on {where}")
        return
    if not states:
        click.echo(f"no device has reported in fleet {fleet!r} on {where}")
        _say_enrolments(enrolments, set())
        return
    now = time.time()
    groups_col = ("GROUPS",) if assigned else ()
    drift_col = ("DRIFT",) if assigned else ()
    rows = [("DEVICE", "ONLINE", *groups_col, "MODELS", "PREVIOUS", "DEPLOYMENT", "CHANGED",
             "HARDWARE", *drift_col, "LAST UPDATE")]
    for s in states.values():
        last = s.last_result or "-"
        if s.last_deployment is not None:
            last += f" (#{s.last_deployment})"
        if s.last_reason and s.last_result != "committed":
            last += f": {s.last_reason}"
        if s.last_download:
            last += f" [{s.last_download}]"
        if s.transfer is not None and s.online:
            last = f"{describe_transfer(s.transfer)}; last: {last}"
        seen = "-" if s.ts is None else _age(now - s.ts)
        mine: tuple[str, ...] = ()
        if assigned:  # from the database: every device has its row
            row = assigned[s.device]
            mine = ((",".join(row["groups"]) or "-") + ("!" if row["mismatch"] else ""),)
            seen = seen if row["registered"] else "never reported"
        online = "silent" if s.device in silent else "yes" if s.online else "no"
        since = s.raw.get("offline_since") if not s.online else None
        if isinstance(since, (int, float)) and not isinstance(since, bool):
            online += f" ({_age(now - since)})"
        if s.raw.get("revoked"):  # from the database: an operator revoked it
            online = "revoked"
        drift: tuple[str, ...] = ()
        if assigned:  # the registry's judgement (the fleet extra is installed)
            from ..fleet._drift import drift_line

            drift = (drift_line(assigned[s.device]["drift"]),)
        rows.append((s.device, online, *mine, s.models_label or "-", s.previous or "-",
                     str(s.deployment or "-"), seen, hardware_line(s.raw.get("hardware")),
                     *drift, last))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        head = "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
        click.echo(f"{head}  {r[-1]}".rstrip())
    _say_shadows({d: assigned[d]["shadow"] if d in assigned else s.raw.get("shadow")
                  for d, s in states.items()})
    _say_mismatches([assigned[d] for d in states if d in assigned])
    _say_drifting([assigned[d] for d in states if d in assigned])
    _say_enrolments(enrolments, set(states))


def _say_drifting(rows: list[dict[str, Any]]) -> None:
    """``status --db``: the devices whose inputs moved from the evaluation set."""
    bad = [r for r in rows if r["drifting"]]
    if not bad:
        return
    from ..fleet._drift import drift_line

    click.echo(f"! {len(bad)} device(s) see inputs that drifted from the evaluation set "
               "their model was verified on (PSI; 'status --drifting --json' for the "
               "figures):")
    for r in bad[:_MISMATCH_SHOWN]:
        click.echo(f"  {r['id']}: {drift_line(r['drift'])}")
    if len(bad) > _MISMATCH_SHOWN:
        click.echo(f"  ... and {len(bad) - _MISMATCH_SHOWN} more")


#: Ids ``status`` names in its enrolment lines (others counted).
_ENROL_SHOWN = 10


def _say_enrolments(rows: list[dict[str, Any]], listed: set[str]) -> None:
    """``status --db``: devices waiting to enrol, and revoked ones not in the table
    (removed from the registry, their enrolment kept)."""
    def ids(xs: list[str]) -> str:
        more = len(xs) - _ENROL_SHOWN
        return ", ".join(xs[:_ENROL_SHOWN]) + (f" and {more} more" if more > 0 else "")

    pending = [r["device_id"] for r in rows if r["state"] == "pending"]
    if pending:
        click.echo(f"! {len(pending)} device(s) waiting to enrol ({ids(pending)}): "
                   "'edge-sdk device pending', then accept or reject them")
    revoked = [r["device_id"] for r in rows if r["state"] == "revoked"
               and r["device_id"] not in listed]
    if revoked:
        click.echo(f"revoked, not in the registry: {ids(revoked)}")


#: Devices whose report-versus-assignment differences ``status`` lists (others counted).
_MISMATCH_SHOWN = 20


def _say_shadows(blocks: dict[str, Any]) -> None:
    """One line per device with a shadow run (running, or its last one's result): the
    model shadowed and the figures, as the device reported them."""
    from ..quality import ShadowFigures

    def shown(v: Any, limit: int = 128) -> str:  # a device's words: one printable line
        return "".join(ch if ch.isprintable() else "?" for ch in str(v)[:limit])

    for d, b in blocks.items():
        if not isinstance(b, dict):
            continue
        what = " ".join(shown(b[k]) for k in ("model", "version") if b.get(k))
        how = b.get("status") or b.get("result")
        said = shown(ShadowFigures.from_json(b.get("figures")).summary(), 500)
        click.echo(f"shadow: {d}" + (f" {what}" if what else "")
                   + (f" {shown(how, 64)}" if how else "") + f": {said}"
                   + (f" (#{b['deployment']})" if isinstance(b.get("deployment"), int)
                      and not isinstance(b["deployment"], bool) else ""))


def _say_mismatches(rows: list[dict[str, Any]]) -> None:
    """The devices whose own report of groups and tags differs from the operator's."""
    bad = [r for r in rows if r["mismatch"]]
    if not bad:
        return
    click.echo(f"! {len(bad)} device(s) report groups or tags other than the operator "
               "assigned (only the assigned ones select devices; 'edge-sdk device set'):")
    for r in bad[:_MISMATCH_SHOWN]:
        click.echo(f"  {r['id']}: {'; '.join(r['mismatch'])}")
    if len(bad) > _MISMATCH_SHOWN:
        click.echo(f"  ... and {len(bad) - _MISMATCH_SHOWN} more")


def _say_registry(counts: list[dict[str, Any]], noisy: list[dict[str, Any]]) -> None:
    """``status --db``: what the registry did not write, who it was, and a backlog."""
    for rs in counts:
        if rs["malformed"] or rs["dropped"] or rs["db_errors"] or rs.get("lost"):
            newest = f" (newest: {rs['last_malformed']})" if rs["last_malformed"] else ""
            click.echo(f"registry: {rs['malformed']} malformed report(s) ignored{newest}, "
                       f"{rs['dropped']} dropped, {rs.get('lost') or 0} lost before the "
                       f"registry, {rs['db_errors']} not stored", err=True)
        behind = (rs.get("updated") or 0) - (rs.get("caught_up") or rs.get("updated") or 0)
        if behind >= 5 or (rs.get("backlog_bytes") or 0) >= 1 << 20:
            click.echo(f"registry: {behind:.0f} s behind, {rs.get('backlog_reports') or 0} "
                       f"report(s) ({(rs.get('backlog_bytes') or 0) >> 20} MiB) queued",
                       err=True)
    for d in noisy:
        what = []
        if d["dropped"]:
            why = f", newest over {d['reason']}" if d["reason"] not in (None, "lost") else ""
            what.append(f"{d['dropped']} report(s) ({d['dropped_bytes'] >> 10} KiB) dropped"
                        f"{why}")
        if d["lost"]:
            what.append(f"{d['lost']} lost before the registry")
        if what:
            click.echo(f"registry: device {d['device']}: {', '.join(what)}", err=True)


#: CPU features shown in the status table (the JSON output has them all), the ones that
#: matter most for int8 / low-precision kernels first.
_STATUS_FEATURES = 6
_FEATURE_RANK = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f", "avx2",
                 "sme", "sve2", "i8mm", "sve", "asimddp", "bf16", "fphp", "asimdhp", "asimd",
                 "neon")


def hardware_line(hw: Any) -> str:
    """A device's reported hardware in one table cell: ``aarch64/4c/asimddp,i8mm``
    (what the device sent is untrusted: only short strings and small ints are shown)."""
    if not isinstance(hw, dict):
        return "-"

    def word(v: Any) -> str | None:
        return v if isinstance(v, str) and 0 < len(v) <= 32 and v.isprintable() \
            and " " not in v else None

    parts = []
    if (arch := word(hw.get("arch"))) is not None:
        parts.append(arch)
    cores = hw.get("cores")
    if isinstance(cores, int) and not isinstance(cores, bool) and 0 < cores < 100000:
        parts.append(f"{cores}c")
    feats = hw.get("cpu_features")
    if isinstance(feats, list):
        shown = [f for f in (word(x) for x in feats[:64]) if f is not None]
        if shown:
            shown.sort(key=lambda f: (_FEATURE_RANK.index(f) if f in _FEATURE_RANK
                                      else len(_FEATURE_RANK), f))
            more = "+" if len(shown) > _STATUS_FEATURES else ""
            parts.append(",".join(shown[:_STATUS_FEATURES]) + more)
    return "/".join(parts) or "-"


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago" if s < 172800 else f"{s // 86400}d ago"


def _device_limits(values: tuple[str, ...]) -> DeviceLimits:
    try:
        changes = numeric_settings(DeviceLimits, values, "--device-limit")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return DeviceLimits(**changes)  # type: ignore[arg-type]


@click.command("serve")
@click.option("--repo", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--no-shared", is_flag=True,
              help="Plain subscription instead of the shared one (brokers without $share; "
                   "serve also falls back by itself when a shared one receives nothing, as "
                   "on NATS).")
@click.option("--device-limit", "device_limit", multiple=True, metavar="KEY=N",
              help="Change one per-device budget, e.g. bytes_per_s=12500000. A device "
                   "alone gets up to the ceiling (bytes_per_s, burst_bytes, requests_per_s); "
                   "several devices asking at once share the responder fairly "
                   "(share_slack_bytes, share_wait_ms, active_ms). Keys: "
                   + ", ".join(f.name for f in dataclasses.fields(DeviceLimits)) + ".")
@click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
              help="Fleet database: sqlite:///PATH or postgresql://... (default: "
                   "REPO/fleet.db).")
@click.option("--registry", "registry_keys", multiple=True, metavar="KEY=N",
              help="Change one registry limit or tunable, e.g. reports_per_s=50 or "
                   "events_per_device=5000 (keys: max_report_bytes, reports_per_s, "
                   "burst_reports, bytes_per_s, burst_bytes, max_queue_bytes, max_devices, "
                   "events_per_device, events_max_age_s, prune_s, heartbeat_s, "
                   "silent_after_missed, resync_s, flush_s; see the README).")
@click.option("--drift-psi", "drift_psi", type=float, metavar="PSI",
              help="Flag a device as drifting when an input's largest per-channel "
                   "population stability index against the evaluation set reaches PSI "
                   "(default 0.25; 0.1 warns). See the README, \"Input drift\".")
@click.option("--drift", "drift_keys", multiple=True, metavar="KEY=N",
              help="Change one drift threshold: psi_warn, psi_alert, min_samples (requests "
                   "before a device can be flagged, default 200), chi2_alpha, or "
                   "method=chi2 (a two-sample chi-square test decides instead of PSI).")
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory holding the deployment key (default: the one given to "
                   "init). The controller signs each wave with it.")
@click.option("--poll", "poll_s", default=0.5, show_default=True, type=float, hidden=True)
@click.option("--lease-ttl", default=15.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds the fleet's controller lease outlives a controller that died; "
                   "a second serve on the same database waits that long to take over.")
@click.option("--http", "http", metavar="HOST:PORT",
              help="Serve the read-only fleet page and its JSON API, e.g. 127.0.0.1:8700 "
                   "(loopback only unless --http-allow-remote).")
@click.option("--http-allow-remote", is_flag=True,
              help="Allow --http on a non-loopback address (reading the page needs no "
                   "sign-in).")
@click.option("--http-behind-tls-proxy", "http_tls_proxy", is_flag=True,
              help="A TLS proxy fronts the page: offer operator sign-in on a non-loopback "
                   "--http and mark the session cookie Secure.")
@click.option("--http-allow-host", "http_hosts", multiple=True, metavar="NAME",
              help="A host name the page may be reached by (a proxy's, a DNS name); other "
                   "names than IP addresses and localhost are refused (DNS rebinding). "
                   "Repeatable.")
@click.option("--only", type=click.Choice(["responder", "fleet"]),
              help="Run one part: 'responder' answers chunk requests (start several side "
                   "by side for more throughput), 'fleet' runs the registry, rollouts and "
                   "page without a responder.")
@click.option("--partition", metavar="K/N",
              help="With --no-shared: answer only the devices of partition K of N (a "
                   "stable hash of the device id), so that N responders split the devices "
                   "on brokers without shared subscriptions.")
@click.option("--stall-timeout", type=click.FloatRange(min=0, max=3600),
              default=ResponderConfig.stall_timeout, show_default=True,
              help="Seconds the broker may leave the responder's watchdog probe "
                   "unacknowledged while the link looks up before the responder reconnects "
                   "(0: no watchdog).")
@click.option("--metrics", "metrics", metavar="HOST:PORT",
              help="Serve the responder's Prometheus counters on http://HOST:PORT/metrics "
                   "(requests, drops, slow-downs, watchdog stalls; no device ids) and the "
                   "seconds before each role's metadata expires.")
@click.option("--enrol", is_flag=True,
              help="Enrol devices by claim and manage their broker accounts (needs the "
                   "broker set up by 'edge-sdk broker init', this account its admin).")
@click.option("--credential-lifetime", "credential_lifetime", metavar="DURATION",
              default="30d", show_default=True,
              help="With --enrol: how long issued device credentials are valid (devices "
                   "renew them before), e.g. 12h, 30d.")
@click.option("--ca-bundle", "ca_bundle", type=click.Path(dir_okay=False, exists=True),
              help="With --enrol: PEM CA certificates sent with credentials (the broker's "
                   "CA, for devices on mqtts).")
@click.option("--enrol-rate", "enrol_rate", metavar="N/s",
              help="With --enrol: enrolment requests taken per claim batch per second "
                   "(more are dropped; default 20/s).")
@click.option("--enrol-limit", "enrol_keys", multiple=True, metavar="KEY=N", hidden=True,
              help="Change one enrolment limit or tunable (IdentityConfig).")
@_mqtt_options
def serve_cmd(repo: str, no_shared: bool, device_limit: tuple[str, ...], db_url: str | None,
              registry_keys: tuple[str, ...],
              keydir: str | None, poll_s: float, lease_ttl: float, http: str | None,
              http_allow_remote: bool, http_tls_proxy: bool, http_hosts: tuple[str, ...],
              only: str | None,
              partition: str | None, stall_timeout: float, metrics: str | None,
              enrol: bool = False, credential_lifetime: str = "30d",
              ca_bundle: str | None = None, enrol_rate: str | None = None,
              enrol_keys: tuple[str, ...] = (), drift_psi: float | None = None,
              drift_keys: tuple[str, ...] = (), **mqtt: Any) -> None:
    """Answer chunk requests for REPO, keep the device registry and run the rollouts
    recorded in the fleet database, until interrupted.

    Each device is answered only on its own response topic and within its own
    budget: alone up to a ceiling (requests and bytes per second, bytes in flight),
    with other devices downloading a fair share of the responder: see --device-limit.
    One serve runs a fleet's registry and rollouts at a time: another one on the same
    database and fleet waits (a standby) until the first stops or its lease expires.
    """
    from ._db import fleet_installed, open_db, other_fleets, resolve_db

    config = _mqtt_config(mqtt)
    limits = _device_limits(device_limit)
    probe_s = ResponderConfig.probe_interval
    rcfg = ResponderConfig(shared=not no_shared, limits=limits,
                           partition=_partition(partition, no_shared),
                           stall_timeout=stall_timeout,
                           probe_interval=min(probe_s, stall_timeout / 3) or probe_s)
    stop = threading.Event()
    if metrics is not None and only == "fleet":
        raise UsageError("--metrics serves the responder's counters: drop --only fleet")
    metrics_at = _metrics_address(metrics)
    if only == "responder":
        # EDGE_DB, which a fleet host exports for its other serve, is no reason to refuse.
        db_given = (db_url is not None and click.get_current_context().get_parameter_source(
            "db_url") is not click.core.ParameterSource.ENVIRONMENT)
        if db_given or http or registry_keys or enrol or drift_psi is not None or drift_keys:
            raise UsageError("--only responder runs no registry or page: drop --db / --http "
                             "/ --registry / --enrol / --drift")
        _serve_responder(repo, keydir, config, rcfg, metrics_at)
        return
    if only is None and db_url is None and http is None and not fleet_installed():
        click.echo("edge-sdk serve: responder only: the registry, rollouts and fleet page "
                   "need the fleet extra (pip install 'edge-sdk[fleet]')", err=True)
        _serve_responder(repo, keydir, config, rcfg, metrics_at)
        return
    if not enrol and (ca_bundle or enrol_rate or enrol_keys or click.get_current_context(
            ).get_parameter_source("credential_lifetime") is not
            click.core.ParameterSource.DEFAULT):
        raise UsageError("--credential-lifetime, --ca-bundle and --enrol-rate configure "
                         "enrolment: add --enrol")
    db = open_db(db_url, repo)  # first: it names the [fleet] extra when it is missing
    from ..fleet import FleetError, FleetServer, RegistryConfig, WebConfig, check_key_permissions

    try:
        web_config = WebConfig.parse(http, allow_remote=http_allow_remote,
                                     allowed_hosts=http_hosts,
                                     behind_tls_proxy=http_tls_proxy) if http else None
        registry_config = RegistryConfig.parse(registry_keys)
        from ..quality import DriftConfig

        drift_config = DriftConfig.parse(drift_keys, psi_alert=drift_psi)
        identity = _identity_config(credential_lifetime, ca_bundle, enrol_rate,
                                    enrol_keys) if enrol else None
    except EdgeError:
        db.close()
        raise
    repository = Repository(repo, keydir)
    check_key_permissions(repository)  # before connecting to the broker

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        with db, MqttConnection(config, name="edge-serve") as conn:
            responder = None if only == "fleet" else RepoResponder(conn, repo, config=rcfg)
            _check_access(conn, responder, fleet=True)
            server = FleetServer(db, repository, conn, registry=registry_config,
                                 web=web_config, poll_s=poll_s, lease_ttl=lease_ttl,
                                 identity=identity, drift=drift_config)
            if server.enroller is not None:
                server.enroller.check_broker()
            if not server.wait_for_lease(stop, say=lambda line: click.echo(
                    f"edge-sdk serve: {line}", err=True)):
                return
            with _keep_fresh(repository) as say_fresh, responder or contextlib.nullcontext(), \
                    server, _metrics_server(responder, metrics_at):
                click.echo(f"serving {Path(repo).resolve()} on {redact_url(config.url)} fleet "
                           f"{config.fleet}; registry and rollouts in {redact_url(db.url)}",
                           err=True)
                if server.enroller is not None:
                    life = server.enroller.config.lifetime_s
                    click.echo(f"enrolling devices by claim (credentials valid "
                               f"{life / 86400:g} days)" if life >= 86400 else
                               f"enrolling devices by claim (credentials valid {life:g} s)",
                               err=True)
                if server.web is not None:
                    click.echo(f"fleet page on {server.web.url}", err=True)
                    if server.web.api.no_sign_in:
                        click.echo(f"fleet page: {server.web.api.no_sign_in}", err=True)
                if hint := other_fleets(db, config.fleet):
                    click.echo(f"fleet {config.fleet!r} has no device yet; {hint}", err=True)
                own = Path(repo) / "fleet.db"
                if own.exists() and db.url != resolve_db(None, repo):
                    # The repository's commands run without --db record there, where
                    # neither this page nor 'audit --db' looks.
                    click.echo(f"{own} exists too: commands given {repo} without --db "
                               "(release add, deploy, ...) write there; export EDGE_DB for "
                               "them", err=True)
                say_fresh()
                try:
                    while not stop.wait(0.5) and server.running:
                        pass
                except KeyboardInterrupt:
                    pass
            rs = server.registry.stats
            click.echo(f"registry: {rs.states} states, {rs.events} events, {rs.malformed} "
                       f"malformed reports ignored, {rs.dropped} dropped, {rs.lost} lost "
                       "before the registry", err=True)
            if server.enroller is not None:
                es = server.enroller.stats
                click.echo(f"enrolment: {es.requests} requests, {es.recorded} recorded, "
                           f"{es.refused} refused, {es.dropped} dropped over the limits, "
                           f"{es.ignored} ignored; {es.issued} credentials issued, "
                           f"{es.renewed} renewed, {es.revoked} revoked, {es.expired} "
                           "expired", err=True)
            if responder is not None:
                _say_stopped(responder.stats)
            if server.lost:
                raise FleetError(server.lost)
    finally:
        signal.signal(signal.SIGTERM, old)


def _identity_config(lifetime: str, ca_bundle: str | None, rate: str | None,
                     keys: tuple[str, ...]) -> Any:
    """``serve --enrol``'s options as an :class:`~edge_sdk.fleet.IdentityConfig`."""
    from ..fleet import IdentityConfig
    from ..release._durations import parse_duration

    changes: dict[str, Any] = {}
    changes["lifetime_s"] = parse_duration(lifetime, "--credential-lifetime").total_seconds()
    if ca_bundle is not None:
        changes["ca_bundle"] = Path(ca_bundle)
    if rate is not None:
        num = rate.strip().lower().removesuffix("/s")
        try:
            changes["rate_per_batch"] = float(num)
        except ValueError:
            raise UsageError(f"--enrol-rate {rate!r}: expected N/s, e.g. 50/s") from None
        if not 0 < changes["rate_per_batch"] < float("inf"):
            raise UsageError(f"--enrol-rate {rate!r}: expected a number > 0")
    config = dataclasses.replace(IdentityConfig.parse(keys), **changes)
    config.read_ca()  # before connecting: a bad --ca-bundle is a usage error
    return config


def _metrics_address(spec: str | None) -> tuple[str, int] | None:
    if spec is None:
        return None
    from ..transport._metrics import parse_address

    return parse_address(spec)


@contextlib.contextmanager
def _metrics_server(responder: RepoResponder | None,
                    at: tuple[str, int] | None) -> Iterator[None]:
    """``--metrics``: the responder's Prometheus counters while serving."""
    if responder is None or at is None:
        yield
        return
    from ..transport._metrics import MetricsServer

    with MetricsServer(responder, *at) as server:
        click.echo(f"responder metrics on {server.url}", err=True)
        yield


@contextlib.contextmanager
def _keep_fresh(repository: Repository) -> Iterator[Callable[[], None]]:
    """Re-sign timestamp and snapshot (and any due role whose keys are here) while serving,
    one line per re-signed role; yields what says (after the 'serving' line) which roles
    are kept fresh and which are not."""
    from ..release import FreshnessKeeper, describe_lifetimes

    keeper = FreshnessKeeper(repository, say=lambda line: click.echo(
        f"edge-sdk serve: {line}", err=True))
    life = repository.lifetimes()

    def say() -> None:
        if keeper.roles:
            click.echo(f"keeping {', '.join(keeper.roles)} fresh (lifetimes "
                       f"{describe_lifetimes({r: life[r] for r in keeper.roles})}; each "
                       "re-signed once half of it has passed)", err=True)
        offline = [r for r in ("snapshot", "timestamp") if r not in keeper.roles]
        if offline:
            click.echo(f"edge-sdk serve: no online key for {' and '.join(offline)} in "
                       f"{repository.keys.dir}: it expires "
                       f"({describe_lifetimes({r: life[r] for r in offline})}) unless "
                       "'edge-sdk release refresh' runs with its key (from cron)", err=True)

    with keeper:
        yield say


def _serve_responder(repo: str, keydir: str | None, config: MqttConfig,
                     rcfg: ResponderConfig,
                     metrics_at: tuple[str, int] | None = None) -> None:
    """``serve`` without the fleet database: answer chunk requests until interrupted."""
    try:
        repository: Repository | None = Repository(repo, keydir)
    except EdgeError as err:
        # A responder host may hold only the served metadata/ and targets/.
        click.echo(f"edge-sdk serve: not re-signing any metadata: {err}", err=True)
        repository = None
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        with MqttConnection(config, name="edge-serve") as conn:
            responder = RepoResponder(conn, repo, config=rcfg)
            _check_access(conn, responder, fleet=False)
            with _keep_fresh(repository) if repository is not None \
                    else contextlib.nullcontext(lambda: None) as say_fresh, responder, \
                    _metrics_server(responder, metrics_at):
                click.echo(f"serving {Path(repo).resolve()} on {redact_url(config.url)} fleet "
                           f"{config.fleet}", err=True)
                say_fresh()
                try:
                    while not stop.wait(0.5):
                        pass
                except KeyboardInterrupt:
                    pass
                _say_stopped(responder.stats)
    finally:
        signal.signal(signal.SIGTERM, old)


def _check_access(conn: MqttConnection, responder: RepoResponder | None, *,
                  fleet: bool) -> None:
    """Say in one line what the broker refuses of what the parts serve runs need (before
    they subscribe: they would see the probes). Serving goes on: a clustered broker may
    grant later what it refuses now."""
    from ..transport._access import describe_refusal, permissions, refused_permissions

    topics = Topics.for_config(conn.config)
    needs: list[Any] = []
    if responder is not None:
        info = responder.announcement()
        needs += permissions("responder", topics, announcement=None if info is None else
                             json.dumps(info).encode())
    if fleet:
        needs += permissions("fleet", topics)
    refused = refused_permissions(conn, needs)
    if refused:
        click.echo(f"edge-sdk serve: {describe_refusal(refused, conn.config.credentials()[0])}"
                   f"; the example ACL (examples/mosquitto) has users {_EXAMPLE_USERS}",
                   err=True)


#: The users examples/mosquitto/make_credentials.py makes for each way of running serve.
_EXAMPLE_USERS = ("edge-serve for both parts, edge-repo for --only responder, edge-fleet "
                  "for --only fleet")


def _say_stopped(st: Any) -> None:
    click.echo(f"stopped: {st.requests} requests, {st.chunks} chunks, {st.bytes_sent} bytes "
               f"sent, {st.slowed} slowed down, {st.dropped} dropped over the rate, "
               f"{st.stalls} stalls", err=True)


def _partition(spec: str | None, no_shared: bool) -> tuple[int, int] | None:
    if spec is None:
        return None
    k, sep, n = spec.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n) <= 1024):
        raise UsageError(f"--partition {spec!r} must be K/N with 0 <= K < N <= 1024")
    if not no_shared:
        raise UsageError("--partition needs --no-shared (with a shared subscription the "
                         "broker already splits the requests)")
    return int(k), int(n)


def _default_state(fleet: str, device: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-sdk" / "pull" / f"{fleet}-{device}"


@click.command("pull")
@click.argument("name")
@click.option("--root", "root", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Trusted root metadata (the device's trust anchor).")
@click.option("--device", required=True, help="Device id (responses come on its topic).")
@click.option("--version", "version",
              help="Version (default: the newest released, not yanked).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Artifact directory to write.")
@click.option("--state", type=click.Path(file_okay=False),
              help="Metadata and partial downloads (default: ~/.cache/edge-sdk/pull/...).")
@click.option("--chunk-size", default=FetchConfig.chunk_size, show_default=True, type=int,
              help="Largest chunk (smaller ones are used on slow links).")
@click.option("--window", default=FetchConfig.window, show_default=True, type=int,
              help="Most chunks in flight (fewer while the link carries fewer).")
@click.option("--timeout", "stall_timeout", default=FetchConfig.stall_timeout,
              show_default=True, type=float,
              help="Give up after this many seconds in which nothing arrived.")
@click.option("--have", "have", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="An artifact dir of an earlier version held here: a signed delta from it "
                   "is fetched instead of the whole model when there is one. Repeatable.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_mqtt_options
def pull_cmd(name: str, root: str, device: str, version: str | None, output: str,
             state: str | None, chunk_size: int, window: int, stall_timeout: float,
             have: tuple[str, ...], quiet: bool, **mqtt: Any) -> None:
    """Fetch and verify release NAME over MQTT without the agent, into an artifact dir."""
    bases = []
    for d in have:
        art = Artifact.from_dir(d)  # hashed: a delta is only as good as its base
        bases.append(LocalModel(art.model_path, art.manifest.sha256))
    config = _mqtt_config(mqtt)
    sdir = Path(state) if state else _default_state(config.fleet, device)
    fetch = FetchConfig(chunk_size=chunk_size, window=window, stall_timeout=stall_timeout)
    with MqttConnection(config, name=f"edge-pull-{device}") as conn:
        client = UpdateClient(trusted_root=Path(root).read_bytes(), metadata_dir=sdir / "tuf",
                              partial_dir=sdir / "partial", connection=conn, device_id=device,
                              fetch_config=fetch)
        if quiet:
            path = client.fetch_release(name, output, version=version, have=bases)
        else:
            with click.progressbar(length=1, label=f"pull {name}", file=sys.stderr) as bar:
                def progress(done: int, total: int) -> None:
                    bar.length = max(total, 1)
                    bar.update(done - bar.pos)

                path = client.fetch_release(name, output, version=version, progress=progress,
                                            have=bases)
    got = client.last_download
    click.echo(f"verified and wrote {path}" + (f" ({got.describe()})" if got else ""))


__all__ = ["deploy_cmd", "pull_cmd", "release_group", "serve_cmd"]


def _audited_models(dep: Deployment) -> dict[str, object]:
    """How the audit log names what a deployment installs: ``model``/``version`` for one
    model (as it always did), ``models``/``remove`` for a set or a removal."""
    if len(dep.models) == 1 and not dep.remove:
        return {"model": dep.models[0].model, "version": dep.models[0].version}
    return {"models": {m.model: m.version for m in dep.models}, "remove": list(dep.remove)}
