"""The `memcr-client` command line."""

from __future__ import annotations

import sys

import click

from memcr_client.client import Client, MemcrClientError
from memcr_client.protocol import DEFAULT_LOCATION, LOCATION_ENV, AddressError, ExitCode


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-l",
    "--location",
    envvar=LOCATION_ENV,
    default=DEFAULT_LOCATION,
    show_default=True,
    show_envvar=True,
    metavar="PORT|HOST:PORT|PATH",
    help="The daemon: TCP PORT on 127.0.0.1, HOST:PORT, or a UNIX socket PATH.",
)
@click.option("-p", "--pid", type=int, required=True, help="Target process.")
@click.option("-c", "--checkpoint", is_flag=True, help="Checkpoint the process.")
@click.option("-r", "--restore", is_flag=True, help="Restore the process.")
@click.version_option(None, "-V", "--version", package_name="memcr-py")
def command(location: str, pid: int, checkpoint: bool, restore: bool) -> None:
    """Ask a memcr daemon to checkpoint and/or restore a process."""
    if not (checkpoint or restore):
        raise click.UsageError("give -c/--checkpoint, -r/--restore or both")
    if pid <= 0:
        raise click.UsageError(f"-p/--pid must be a positive process id, not {pid}")
    try:
        client = Client(location)
    except AddressError as e:
        raise click.UsageError(f"-l/--location: {e}") from None
    if checkpoint:
        client.checkpoint(pid)
        click.echo(f"pid {pid} checkpointed")
    if restore:
        client.restore(pid)
        click.echo(f"pid {pid} restored")


def main() -> None:
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"memcr-client: error: {e.format_message()}", err=True)
        sys.exit(ExitCode.USAGE)
    except MemcrClientError as e:
        click.echo(f"memcr-client: error: {e}", err=True)
        sys.exit(ExitCode.FAILED)
