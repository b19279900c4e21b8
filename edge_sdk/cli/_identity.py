"""Device identity on the command line: ``broker init`` (the broker's accounts, through
Mosquitto's dynamic security plugin). Fleet-database commands of device identity import
the fleet lazily, inside each command, so that ``broker init`` needs no database."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError


@click.group("broker")
def broker_group() -> None:
    """The MQTT broker's accounts, kept by Mosquitto's dynamic security plugin."""


@broker_group.command("init")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fleet", required=True, help="The fleet whose topics the accounts get.")
@click.option("--operator", "operators", multiple=True, metavar="NAME",
              help="An operator account, one per person or script (repeatable; default: "
                   "edge-operator-1 and edge-operator-2).")
@click.option("--responder", "responders", multiple=True, metavar="NAME",
              help="A 'serve --only responder' account, one per process (repeatable; "
                   "default: edge-repo).")
@click.option("--force", is_flag=True,
              help="Overwrite an existing dynamic-security.json (every account the broker "
                   "made since, devices included, is lost).")
def init_cmd(outdir: Path, fleet: str, operators: tuple[str, ...],
             responders: tuple[str, ...], force: bool) -> None:
    """Write OUTDIR/dynamic-security.json (the service and operator accounts),
    OUTDIR/mosquitto.conf and OUTDIR/credentials.json (their passwords, mode 0600: hand
    each its own, then delete the file). edge-serve and edge-fleet are also the plugin's
    admins: 'serve --enrol' makes the device accounts at run time."""
    from ..fleet._dynsec import broker_config, broker_user, plugin_path

    existing = outdir / "dynamic-security.json"
    if existing.exists() and not force:
        raise UsageError(f"{existing} exists: the broker keeps every device account in it "
                         "(--force to start over and lose them)")
    try:
        creds = broker_config(outdir, fleet=fleet, operators=operators,
                              responders=responders)
    except OSError as err:
        raise UsageError(f"{outdir}: cannot write the broker's files: "
                         f"{err.strerror or err}") from None
    broker = broker_user()
    owner = (f"dynamic-security.json and {outdir} owned by {broker.pw_name}"
             if broker is not None else
             "dynamic-security.json is yours, mode 0600: mosquitto must run as you "
             "(it rewrites the file on every change), or chown it and the directory")
    plugin = plugin_path()
    missing = "" if Path(plugin).exists() else (
        f"; {plugin} not found: install mosquitto >= 2.0 or fix the plugin line")
    click.echo(f"wrote {outdir}/dynamic-security.json, mosquitto.conf, credentials.json "
               f"(accounts: {', '.join(creds)}; {owner}{missing})")
