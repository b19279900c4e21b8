"""``edge-sdk samples allow|deny|list|request|pull``: field samples (see
``edge_sdk.samples``). The allow list lives in the fleet database; ``request`` refuses a
device it does not allow, signs with the repository's deployment key and prints the
request id; ``pull`` waits for the bundle, checks it and writes a calibration set."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, UsageError
from ._db import fleet_db, open_db, require_fleet
from ._fleet import db_options, operator_option
from ._release import _mqtt_config, _mqtt_options

_fleet_option = click.option("--fleet", default="default", show_default=True,
                             envvar="EDGE_FLEET", show_envvar=True, help="Fleet name.")


@click.group("samples")
def samples_group() -> None:
    """Field samples: inputs a device's model served, kept on the device only while a
    signed request asks for them, pulled as a calibration set for 'convert --eval'."""


def _target(device: str | None, group: str | None) -> tuple[str, str]:
    if (device is None) == (group is None):
        raise UsageError("name exactly one of --device ID or --group NAME")
    return ("device", device) if device is not None else ("group", str(group))


def _toggle(name: str, allow: bool) -> click.Command:
    @click.command(name)
    @click.option("--device", help="Device id.")
    @click.option("--group", help="Device group.")
    @_fleet_option
    @db_options
    @operator_option
    def cmd(device: str | None, group: str | None, fleet: str, db_url: str | None,
            repo_dir: str | None, operator: str | None) -> None:
        scope, who = _target(device, group)
        require_fleet()  # first: it names the [fleet] extra when it is missing
        from .. import fleet as fl
        from ..fleet import _samples as policy

        with open_db(db_url, repo_dir) as db:
            if allow:
                new = policy.allow_samples(db, fleet, scope, who, fl.actor_name(operator))
                click.echo(f"{scope} {who} allows field samples in fleet {fleet}"
                           + ("" if new else " (it already did)"))
            else:
                gone = policy.deny_samples(db, fleet, scope, who, fl.actor_name(operator))
                click.echo(f"{scope} {who} no longer allows field samples in fleet {fleet}"
                           if gone else f"{scope} {who} did not allow field samples")

    cmd.help = ("Let the host ask a device (or every device of a group) for field "
                "samples." if allow else "Take that permission back.")
    return cmd


samples_group.add_command(_toggle("allow", True))
samples_group.add_command(_toggle("deny", False))


@samples_group.command("list")
@_fleet_option
@db_options
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def list_cmd(fleet: str, db_url: str | None, repo_dir: str | None, as_json: bool) -> None:
    """Show which devices and groups allow field samples."""
    require_fleet()
    from ..fleet import _samples as policy

    with open_db(db_url, repo_dir) as db:
        rows = policy.sample_policy(db, fleet)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no device or group allows field samples in fleet {fleet}")
        return
    for r in rows:
        when = datetime.fromtimestamp(r["allowed_at"], UTC).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{r['scope']:6} {r['name']:24} allowed by {r['allowed_by']} {when}Z")


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
             "g": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    if not num.isdigit() or t[len(num):] not in units:
        raise UsageError(f"--max-bytes {text!r}: expected bytes, e.g. 16MiB or 500000")
    return int(num) * units[t[len(num):]]


@samples_group.command("request")
@click.argument("repo", type=click.Path(file_okay=False, exists=True))
@click.option("--device", required=True, help="The device to collect on.")
@click.option("--model", required=True, help="The served model whose inputs to keep.")
@click.option("--rule", required=True,
              type=click.Choice(["disagreement", "low_confidence", "drift", "random"]),
              help="Which inputs: disagreeing with a shadow model, low top score, far "
                   "from the conversion's reference, or uniformly drawn.")
@click.option("--count", default=100, show_default=True, type=int,
              help="Samples wanted (at most 1000).")
@click.option("--max-bytes", "max_bytes", default="16MiB", show_default=True,
              help="Largest bundle (at most 64MiB).")
@click.option("--threshold", default="0", show_default=True,
              help="low_confidence: top score below it; drift: z-score above it; random: "
                   "requests to draw from (0: until the request expires).")
@click.option("--outputs", is_flag=True, help="Keep the model's outputs too.")
@click.option("--expires", "expires", default="1d", show_default=True,
              help="How long the device collects (90s, 2m, 12h, 7d).")
@click.option("--keys", "keydir", type=click.Path(file_okay=False),
              help="Key directory (default: the repository's).")
@click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
              help="Fleet database with the allow list (default: REPO/fleet.db).")
@operator_option
@_mqtt_options
def request_cmd(repo: str, device: str, model: str, rule: str, count: int, max_bytes: str,
                threshold: str, outputs: bool, expires: str, keydir: str | None,
                db_url: str | None, operator: str | None, **kw: Any) -> None:
    """Ask DEVICE for up to COUNT inputs of MODEL matching RULE; prints the request id."""
    require_fleet()
    from .. import fleet as fl
    from ..fleet import _samples as policy
    from ..release import Repository, parse_duration
    from ..samples import SampleRequest
    from ..samples._host import new_request_id, publish_request
    from ..transport import MqttConnection
    from ..trust._keys import DEPLOYMENT_ROLE

    config = _mqtt_config(kw)
    try:
        thr = float(threshold)
    except ValueError:
        raise UsageError(f"--threshold {threshold!r} must be a number") from None
    life = parse_duration(expires, "--expires")
    now = datetime.now(UTC).replace(microsecond=0)
    req = SampleRequest(fleet=config.fleet, device=device, id=new_request_id(),
                        issued=now, expires=now + life, model=model, rule=rule,
                        count=count, max_bytes=_size(max_bytes), outputs=outputs,
                        threshold=thr)
    # The same checks the device makes, before anything is signed or sent.
    from ..samples._request import SAMPLE_REQUEST

    SAMPLE_REQUEST.body(req.to_signed())
    with fleet_db(db_url, repo, config.fleet) as db:
        why = policy.check_samples_allowed(db, config.fleet, device)
        r = Repository(repo, keydir)
        signers = r.keys.signers(DEPLOYMENT_ROLE)
        if not signers:
            raise ConfigError(f"{r.keys.dir}: no deployment key to sign sample requests")
        with MqttConnection(config, name=f"edge-samples-{device}") as conn:
            publish_request(conn, req, signers[:1])
        db.record_audit(fl.actor_name(operator), "samples.request", {
            "fleet": config.fleet, "device": device, "id": req.id, "model": model,
            "rule": rule, "count": count, "max_bytes": req.max_bytes,
            "outputs": outputs, "allowed_by": why,
            "expires": (now + life).strftime("%Y-%m-%dT%H:%M:%SZ")})
    click.echo(req.id)


@samples_group.command("pull")
@click.argument("request_id")
@click.option("--device", required=True, help="The device the request went to.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The calibration file to write (.npz).")
@click.option("--wait", "wait", default="30s", show_default=True,
              help="How long to wait for the bundle to be ready (90s, 10m, 2h).")
@click.option("--db", "db_url", envvar="EDGE_DB", show_envvar=True,
              help="Fleet database whose audit log records the pull (optional).")
@operator_option
@_mqtt_options
def pull_cmd(request_id: str, device: str, out: str, wait: str, db_url: str | None,
             operator: str | None, **kw: Any) -> None:
    """Fetch the bundle of REQUEST_ID from DEVICE, check its size and sha256, and write
    it as a calibration set (inputs by name; outputs and scores in OUT.extra.npz)."""
    from ..release import parse_duration
    from ..samples._host import pull_bundle, wait_status
    from ..transport import MqttConnection
    from ..transport._config import check_topic_word

    check_topic_word(device, "device id")
    if not 16 <= len(request_id) <= 64 or set(request_id) - set("0123456789abcdef"):
        raise UsageError(f"{request_id[:80]!r} is not a request id (16-64 hex digits, as "
                         "'samples request' printed)")
    timeout = parse_duration(wait, "--wait") / timedelta(seconds=1)
    config = _mqtt_config(kw)
    t0 = time.monotonic()
    with MqttConnection(config, name=f"edge-samples-pull-{device}") as conn:
        st = wait_status(conn, device, request_id, timeout=timeout)
        got = pull_bundle(conn, device, st, Path(out))
    if db_url:
        from ._db import record

        record(db_url, None, operator, "samples.pull", {
            "fleet": config.fleet, "device": device, "id": request_id,
            "count": got.count, "bytes": st.size, "sha256": st.sha256})
    note = f" ({st.reason})" if st.reason else ""
    click.echo(f"{got.path}: {got.count} sample(s) of {', '.join(got.inputs)} from {device} "
               f"in {time.monotonic() - t0:.1f} s{note}"
               + (f"; outputs and scores in {got.extra}" if got.extra else ""))
