"""The `meshlet` command: a dispatcher that imports each component only when its
subcommand runs, so `meshlet certs ...` never pays for grpc or pyroute2.

Every failure ends as one line on stderr and an exit code:
0 success; 1 the operation was refused or failed; 2 bad input (flags, files, values).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from meshlet import __version__
from meshlet.errors import MeshError

# subcommand → "module:attribute" of a click command, imported on use.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "certs": ("certs.cli:certs", "create and rotate the mesh's certificates"),
    "control-plane": ("control_plane.cli:main", "run the control plane"),
    "get": ("meshlet.ctl:get", "list services, endpoints, nodes or VIPs"),
    "describe": ("meshlet.ctl:describe", "show a service with its policy and endpoints"),
    "apply": ("meshlet.ctl:apply", "create or update services from YAML"),
    "delete": ("meshlet.ctl:delete", "delete a service"),
    "sidecar": ("sidecar.cli:main", "the per-container sidecar proxy and its traffic interception"),
    "node": ("node.cli:main", "the node helper: the VXLAN overlay and container attachment"),
    "lab": ("node.lab_cli:main", "a multi-node mesh in network namespaces on this machine"),
    "inject": ("compose.cli:inject", "add sidecars to a docker compose file"),
    "uninject": ("compose.cli:uninject", "take the sidecars out of a docker compose file"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            target, _ = LAZY_COMMANDS[cmd_name]
            module_name, attr = target.split(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in sorted(LAZY_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshlet")
def cli() -> None:
    """meshlet: a service mesh for containers."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return (and exit with) the process exit code."""
    try:
        result: Any = cli.main(args=argv, prog_name="meshlet", standalone_mode=False)
    except MeshError as e:
        _fail(str(e))
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`meshlet get ... | head`): not an error
        sys.exit(0)
    except click.exceptions.Abort:
        _fail("aborted")
        sys.exit(1)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)  # UsageError carries the command it was raised in
        where = ctx.command_path if ctx is not None else "meshlet"
        _fail(f"{e.format_message()} (see `{where} --help`)")
        sys.exit(e.exit_code)
    code = result if isinstance(result, int) else 0
    sys.exit(code)


def _fail(message: str) -> None:
    click.echo(f"meshlet: error: {message}", err=True)


if __name__ == "__main__":
    main()
