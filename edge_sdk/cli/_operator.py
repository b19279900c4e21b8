"""``operator add|list|passwd|disable|enable|remove``: the accounts that may sign in to the
fleet page and act on rollouts there (see ``edge_sdk.fleet._operators``). A password is
read from a prompt (twice) or, with ``--password-stdin``, from the first line of stdin;
never from the command line, where other users could read it."""

from __future__ import annotations

import json
import sys
import time

import click

from ..errors import UsageError
from ._db import open_db, require_fleet
from ._fleet import db_options, operator_option


@click.group("operator")
def operator_group() -> None:
    """Operator accounts of the fleet page (sign-in to approve, pause, resume and abort
    rollouts there), kept in the fleet database."""


def _password(stdin: bool) -> str:
    if not stdin:
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    line = sys.stdin.readline(4096)
    if not line:
        raise UsageError("--password-stdin: stdin is empty")
    return line.removesuffix("\n").removesuffix("\r")


_stdin_option = click.option("--password-stdin", "password_stdin", is_flag=True,
                             help="Read the password from the first line of stdin "
                                  "(scripts) instead of a prompt.")


@operator_group.command("add")
@click.argument("name")
@db_options
@operator_option
@_stdin_option
def add_cmd(name: str, db_url: str | None, repo_dir: str | None, operator: str | None,
            password_stdin: bool) -> None:
    """Make operator NAME (asks for its password)."""
    require_fleet()  # first: it names the [fleet] extra when it is missing
    from .. import fleet as fl
    from ..fleet import _operators as ops

    ops.check_name(name)  # before asking for a password
    password = _password(password_stdin)
    with open_db(db_url, repo_dir) as db:
        ops.add_operator(db, name, password, fl.actor_name(operator))
    click.echo(f"operator {name} added; they sign in on the fleet page ('edge-sdk serve "
               "--http')")


@operator_group.command("passwd")
@click.argument("name")
@db_options
@operator_option
@_stdin_option
def passwd_cmd(name: str, db_url: str | None, repo_dir: str | None, operator: str | None,
               password_stdin: bool) -> None:
    """Give operator NAME a new password; its sessions end."""
    require_fleet()  # first: it names the [fleet] extra when it is missing
    from .. import fleet as fl
    from ..fleet import _operators as ops

    password = _password(password_stdin)
    with open_db(db_url, repo_dir) as db:
        ops.set_password(db, name, password, fl.actor_name(operator))
    click.echo(f"operator {name}: password changed; signed out everywhere")


def _toggle(name: str, disabled: bool) -> click.Command:
    @click.command(name)
    @click.argument("name")
    @db_options
    @operator_option
    def cmd(name: str, db_url: str | None, repo_dir: str | None,
            operator: str | None) -> None:
        require_fleet()
        from .. import fleet as fl
        from ..fleet import _operators as ops

        with open_db(db_url, repo_dir) as db:
            ops.set_disabled(db, name, disabled, fl.actor_name(operator))
        click.echo(f"operator {name} " + ("disabled; signed out everywhere" if disabled
                                          else "enabled"))

    cmd.help = ("Stop operator NAME signing in (its sessions end)." if disabled
                else "Let a disabled operator NAME sign in again.")
    return cmd


operator_group.add_command(_toggle("disable", True))
operator_group.add_command(_toggle("enable", False))


@operator_group.command("remove")
@click.argument("name")
@db_options
@operator_option
def remove_cmd(name: str, db_url: str | None, repo_dir: str | None,
               operator: str | None) -> None:
    """Remove operator NAME; its sessions end at once."""
    require_fleet()  # first: it names the [fleet] extra when it is missing
    from .. import fleet as fl
    from ..fleet import _operators as ops

    with open_db(db_url, repo_dir) as db:
        ops.remove_operator(db, name, fl.actor_name(operator))
    click.echo(f"operator {name} removed")


@operator_group.command("list")
@db_options
@click.option("--json", "as_json", is_flag=True)
def list_cmd(db_url: str | None, repo_dir: str | None, as_json: bool) -> None:
    """List the operators and their live sessions."""
    require_fleet()
    from ..fleet import _operators as ops

    with open_db(db_url, repo_dir) as db:
        rows = ops.list_operators(db)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no operators ('edge-sdk operator add NAME' makes one)")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        click.echo(f"{r['name']:<20} {'disabled' if r['disabled'] else 'enabled':<9} "
                   f"{r['sessions']} session(s)  added {when} by {r['created_by']}")


__all__ = ["operator_group"]
