"""``edge-sdk agent`` / ``device_agent``: run the daemon from a TOML config."""

from __future__ import annotations

import logging
import sys

import click

from edge_sdk._internal import add_secret

from ._config import AgentConfig


@click.command("agent")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Agent config file (TOML); see examples/agent.toml.")
@click.option("--check", is_flag=True, help="Check the config and the state directory, then "
              "exit without serving.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def agent_cmd(config_path: str, check: bool, log_level: str) -> None:
    """Run the device agent: keep the deployed model installed and serve it over HTTP
    (KServe v2) on the configured address until SIGTERM."""
    config = AgentConfig.from_file(config_path)
    for secret in (*config.broker.all_urls, config.broker.password,
                   config.identity.claim_password if config.identity else None):
        add_secret(secret)
    logging.basicConfig(
        level=getattr(logging, log_level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ._agent import Agent

    if check:
        from ._state import StateStore

        state = StateStore(config.state_dir).load()
        cur = state.current
        click.echo(f"config ok: device {config.device_id} in fleet {config.fleet}, "
                   f"state in {config.state_dir}, model "
                   f"{cur.label() if cur else 'none installed yet'}")
        if config.identity is not None:
            click.echo(_identity_line(config))
        return
    # Install work (TUF metadata, hashing) is Python code holding the GIL; a shorter switch
    # interval than the default 5 ms bounds how long a request thread waits behind it.
    sys.setswitchinterval(0.001)
    Agent(config).run()


def _identity_line(config: AgentConfig) -> str:
    import time

    from ._identity import CredentialStore

    current, pending = CredentialStore(config.identity_dir).load()
    key = "made" if config.key_path.is_file() else "made at first start"
    batch = config.identity.batch if config.identity else "?"
    if current is None and pending is None:
        return f"identity: not enrolled yet (claim batch {batch}; device key {key})"
    held = current or pending
    assert held is not None
    left = held.seconds_left(time.time())
    state = f"{left:.0f} s left" if left > 0 else "expired: it enrols again"
    return (f"identity: enrolled as {held.creds.username}, credentials "
            f"#{held.creds.issued} ({state}), groups "
            f"{', '.join(held.creds.groups) or 'none'}")


def main() -> None:
    """Entry point of the ``device_agent`` console script."""
    from edge_sdk.cli import main as cli_main

    sys.exit(cli_main(["agent", *sys.argv[1:]]))
