"""The ``autowisp`` command line."""

from __future__ import annotations

import typer

from autowisp import __version__
from autowisp.cli import lightcurves, pipeline, service, stars
from autowisp.cli.demo import demo
from autowisp.cli.simulate import simulate

app = typer.Typer(
    name="autowisp",
    help="AutoWISP: raw DSLR night-sky frames to calibrated light curves.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(name="demo")(demo)
app.command(name="simulate")(simulate)
app.command(name="init")(pipeline.init)
app.command(name="ingest")(pipeline.ingest)
app.command(name="run")(pipeline.run)
app.command(name="status")(pipeline.status)
app.command(name="retry")(pipeline.retry)
app.command(name="prune")(pipeline.prune)
app.command(name="close-night")(pipeline.close_night)
app.command(name="scheduler")(service.scheduler)
app.command(name="worker")(service.worker)
app.command(name="watch")(service.watch)
app.add_typer(pipeline.config_app, name="config")
app.add_typer(stars.stars_app, name="stars")
app.add_typer(lightcurves.lc_app, name="lc")


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(f"autowisp {__version__}")
        raise typer.Exit()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
