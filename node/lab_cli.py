"""`meshlet lab ...`: a multi-node mesh in network namespaces on this machine.

Flags become a Layout (node/lab_scenario.py) and a run directory; the work happens in
node/lab_build.py (up), lab_down.py (down, status), lab_ops.py (scale, kill, partition,
heal) and lab_top.py (top). This module parses, prints and never catches a MeshError
except to add where to look when `up` fails halfway (the dispatcher in meshlet/cli.py
prints it as one line).
"""

from __future__ import annotations

from pathlib import Path

import click

from meshlet.errors import MeshError
from node.lab import DEFAULT_RUN_DIR, Lab
from node.lab_scenario import DEFAULT_PREFIX, DEFAULT_UNDERLAY

run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_RUN_DIR,
    show_default=True,
    envvar="MESHLET_LAB_DIR",
    help="Where the lab records what it created (journal.jsonl), its logs and state.",
)


def _lab(run_dir: Path) -> Lab:
    return Lab(run_dir.absolute())


@click.group("lab")
def main() -> None:
    """A multi-node mesh in network namespaces on this machine (root, Linux).

    `up` builds nodes joined by a VXLAN overlay, the control plane, and containers (an app
    and a transparent sidecar each) with traffic running; `top` shows it; `scale`, `kill`,
    `partition` and `heal` change it; `down` removes everything it created.
    """


@main.command()
@click.option("--nodes", type=int, default=2, show_default=True, help="How many nodes.")
@click.option("--scenario", default="demo", show_default=True, help="What runs on them.")
@click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Namespaces are named PREFIX-sw, PREFIX-cp, PREFIX-node1, PREFIX-web-0, ...",
)
@click.option(
    "--underlay",
    default=DEFAULT_UNDERLAY,
    show_default=True,
    help="The nodes' network (a /24 of 198.18.0.0/16).",
)
@run_dir_option
def up(nodes: int, scenario: str, prefix: str, underlay: str, run_dir: Path) -> None:
    """Build the lab and start its traffic; print what was built and where to look."""
    from node import lab_build, lab_report
    from node.lab_scenario import Layout
    from node.lab_scenario import scenario as find_scenario

    layout = Layout(prefix=prefix, nodes=nodes, underlay=underlay)
    chosen = find_scenario(scenario)
    lab = _lab(run_dir)
    try:
        seconds = lab_build.up(lab, layout, chosen, click.echo)
    except (MeshError, KeyboardInterrupt, OSError) as e:
        if not lab.journal.exists() or lab.state().lab is None:
            raise
        flag = lab_build.run_dir_flag(lab)
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        raise MeshError(
            f"lab up failed: {reason}. What was built stays for a look (logs in "
            f"{lab.logs}, `meshlet lab status{flag}`); `meshlet lab down{flag}` removes it"
        ) from e
    flag = lab_build.run_dir_flag(lab)
    for line in lab_report.summary(lab.state(), layout, lab.run_dir, seconds, flag=flag):
        click.echo(line)


@main.command()
@click.option("--keep-logs", is_flag=True, help="Keep RUN_DIR/logs (everything else goes).")
@run_dir_option
def down(keep_logs: bool, run_dir: Path) -> None:
    """Remove every namespace, link, rule, process and file the lab created — also after
    `lab up` crashed or was killed."""
    from node import lab_down

    left = lab_down.down(_lab(run_dir), click.echo, keep_logs=keep_logs)
    if left is None:
        click.echo(f"nothing to take down: no lab journal in {run_dir}")
        return
    if left:
        raise MeshError(
            f"lab down left {len(left)} things behind: {'; '.join(left[:5])}; "
            "run `meshlet lab down` again, or remove them by hand"
        )
    click.echo("the lab is down; nothing it created is left")


@main.command()
@run_dir_option
def status(run_dir: Path) -> None:
    """List what the lab created and whether each is still there (exit 1 if anything is
    missing or dead)."""
    from node import lab_down, lab_report, lab_state

    lab = _lab(run_dir)
    lab.settings()
    state = lab.state()
    observed = lab_state.status_rows(state, lab_down.observe(lab, state))
    for line in lab_report.status(state, lab.layout(), lab.run_dir, observed):
        click.echo(line)
    if observed.problems:
        raise SystemExit(1)


@main.command()
@click.option("--once", is_flag=True, help="Print one table (rates over --interval) and exit.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds per refresh.")
@click.option(
    "--window", type=float, default=10.0, show_default=True, help="Rates over this many seconds."
)
@click.option(
    "--seconds", type=float, default=0.0, help="Stop after this long (default: until Ctrl-C)."
)
@run_dir_option
def top(once: bool, interval: float, window: float, seconds: float, run_dir: Path) -> None:
    """Per service: requests (or connections) per second, success rate, p50/p99 latency and
    which replicas served, from the sidecars' metrics."""
    from rich.console import Console

    from node import lab_top

    if interval <= 0 or window <= 0:
        raise click.BadParameter("--interval and --window must be greater than 0")
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=150)
    lab_top.top(
        _lab(run_dir), console, once=once, interval=interval, window=window, seconds=seconds
    )


@main.command()
@click.argument("target", metavar="NS/NAME=N")
@run_dir_option
def scale(target: str, run_dir: Path) -> None:
    """Set a service's replica count (the VIP stays; removed replicas drain first)."""
    from node import lab_ops
    from node.lab_scenario import parse_scale

    key, count = parse_scale(target)
    lab_ops.scale(_lab(run_dir), key, count, click.echo)


@main.command()
@click.argument("replica", metavar="NS/NAME#INDEX")
@run_dir_option
def kill(replica: str, run_dir: Path) -> None:
    """Kill one replica's app (SIGKILL); its sidecar stays, and callers eject it."""
    from node import lab_ops
    from node.lab_scenario import parse_replica

    key, index = parse_replica(replica)
    lab_ops.kill(_lab(run_dir), key, index, click.echo)


@main.command()
@click.argument("node")
@run_dir_option
def partition(node: str, run_dir: Path) -> None:
    """Drop the overlay's UDP (VXLAN, port 4789) to and from NODE."""
    from node import lab_ops

    lab_ops.partition(_lab(run_dir), node, click.echo)


@main.command()
@click.argument("node")
@run_dir_option
def heal(node: str, run_dir: Path) -> None:
    """Undo `lab partition NODE`."""
    from node import lab_ops

    lab_ops.heal(_lab(run_dir), node, click.echo)
