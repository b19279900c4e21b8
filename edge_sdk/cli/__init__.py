"""The ``edge-sdk`` command line: thin wrappers over the public APIs.

Commands are imported lazily so that ``edge-sdk predict`` on a device never
imports the converters, and a role's missing extra gives a one-line hint.
Every :class:`~edge_sdk.errors.EdgeError` is caught here, once, and printed
as one line; ``--debug`` shows the traceback instead. What this process prints
(error lines and log records) passes through :mod:`edge_sdk._redact`: no
password given on the command line, in a URL or in the environment is shown.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import click

from .._redact import install_log_redaction, redact
from ..errors import EdgeError

# name -> (module:attribute, extra that provides its dependencies, short help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("edge_sdk.cli._model:inspect_cmd", "", "Show an artifact's or model's signature, "
                "format, size, quantization and ops."),
    "predict": ("edge_sdk.cli._model:predict_cmd", "", "Run a model offline on an input file."),
    "bench": ("edge_sdk.cli._model:bench_cmd", "", "Measure latency percentiles and throughput."),
    "convert": ("converters._cli:convert_cmd", "convert", "Convert, optimize, quantize and "
                "verify a model into an artifact."),
    "release": ("edge_sdk.cli._release:release_group", "agent", "Manage the signed (TUF) "
                "release repository."),
    "deploy": ("edge_sdk.cli._release:deploy_cmd", "agent", "Sign a deployment and publish it "
               "to a device or group."),
    "status": ("edge_sdk.cli._release:status_cmd", "agent", "Show the devices' reported "
               "state: online, model, last update."),
    "serve": ("edge_sdk.cli._release:serve_cmd", "agent", "Run the repository responder, device "
              "registry and rollout controller."),
    "pull": ("edge_sdk.cli._release:pull_cmd", "agent", "Fetch and verify an artifact over MQTT "
             "without the agent."),
    "rollout": ("edge_sdk.cli._fleet:rollout_group", "agent", "Staged rollouts: start, "
                "status, pause, resume, abort, list (recorded in the fleet DB), or run."),
    "device": ("edge_sdk.cli._fleet:device_group", "fleet", "Assign devices the groups and "
               "tags rollouts select by; accept, reject, revoke enrolled devices; remove "
               "devices from the registry."),
    "claim": ("edge_sdk.cli._fleet:claim_group", "fleet", "Claim accounts devices enrol "
              "with: create, revoke, list."),
    "operator": ("edge_sdk.cli._operator:operator_group", "fleet", "Operator accounts that "
                 "sign in to the fleet page to approve, pause, resume and abort rollouts."),
    "broker": ("edge_sdk.cli._identity:broker_group", "fleet", "The broker's accounts "
               "(Mosquitto's dynamic security plugin): init writes its config."),
    "audit": ("edge_sdk.cli._fleet:audit_cmd", "fleet", "Show the audit log of operator "
              "actions."),
    "samples": ("edge_sdk.cli._samples:samples_group", "fleet", "Field samples: allow, "
                "deny, list the devices that may be asked; request inputs; pull them as a "
                "calibration set."),
    "agent": ("device_agent._cli:agent_cmd", "agent", "Run the device agent daemon."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, (target, _, _) in _COMMANDS.items() if _module_exists(target)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None or not _module_exists(entry[0]):
            return None
        target, extra, _ = entry
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            hint = f" (pip install 'edge-sdk[{extra}]')" if extra else ""
            raise EdgeError(
                f"'{cmd_name}' needs a package that is not installed: {err.name or err}{hint}"
            ) from err
        cmd = getattr(module, attr)
        assert isinstance(cmd, click.Command)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, _COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(target: str) -> bool:
    module_name = target.split(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ImportError:
        return False


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="edge-sdk", prog_name="edge-sdk")
def cli(debug: bool) -> None:
    """edge-sdk: convert models for small devices, roll them out, serve them locally."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    install_log_redaction()
    try:
        rv: Any = cli.main(args=args, prog_name="edge-sdk", standalone_mode=False)
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.Abort:
        click.echo("edge-sdk: aborted", err=True)
        return 130
    except click.ClickException as err:
        if debug:
            _print_traceback()
        click.echo(f"edge-sdk: error: {redact(err.format_message())}", err=True)
        return err.exit_code
    except EdgeError as err:
        if debug:
            _print_traceback()
        click.echo(f"edge-sdk: error: {_summary(err, debug)}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("edge-sdk: interrupted", err=True)
        return 130
    except Exception as err:
        if debug:
            _print_traceback()
        click.echo(
            f"edge-sdk: internal error: {type(err).__name__}: {_summary(err, debug)} "
            "(run with --debug for the traceback and please report it)",
            err=True,
        )
        return 70
    return rv if isinstance(rv, int) else 0


def _print_traceback() -> None:
    sys.stderr.write(redact(traceback.format_exc()))


MAX_ERROR_CHARS = 300


def _summary(err: BaseException, full: bool = False) -> str:
    """``err`` on one line, at most about :data:`MAX_ERROR_CHARS` characters unless
    ``full``: a message that embeds a library's dump (one skl2onnx error was 700,000
    characters) is cut at a word, keeps the cause's class, and says how to see it all."""
    text = redact(" ".join(str(err).split()))
    if full or len(text) <= MAX_ERROR_CHARS:
        return text
    cut = text[:MAX_ERROR_CHARS]
    space = cut.rfind(" ")
    if space > MAX_ERROR_CHARS // 2:
        cut = cut[:space]
    cause = err.__cause__ or err.__context__
    if cause is not None and type(cause).__name__ not in cut:
        cut += f" [caused by {type(cause).__name__}]"
    return f"{cut} … ({len(text) - len(cut):,} more characters; --debug shows them)"


__all__ = ["cli", "main"]
