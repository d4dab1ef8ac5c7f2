"""The `fedmed` command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fedmed.errors import FedmedError, os_error_line
from fedmed.run import interrupt

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

app = typer.Typer(
    help="Federated learning on brain MRI across hospitals, on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: check one on disk, or write out the embedded demo hospitals.", no_args_is_help=True)
app.add_typer(data_app, name="data")
certs_app = typer.Typer(help="Deployment keys: the federation's CA and server certificate, a hospital node's key pair.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
server_app = typer.Typer(help="The coordinating centre: run the federation's server, see its progress.", no_args_is_help=True)
app.add_typer(server_app, name="server")
site_app = typer.Typer(help="A hospital: run its node against the federation's server.", no_args_is_help=True)
app.add_typer(site_app, name="site")
ConfigOption = Annotated[Path, typer.Option("--config", help="The TOML config (server/federation.toml, sites/NAME.toml).")]
SetOption = Annotated[list[str], typer.Option("--set", help="Override one value: section.key=value.")]


def _stop_on_sigterm() -> None:
    """`kill` (or a service manager) stops a long-running command as Ctrl-C does, so it
    stops the Flower processes it started instead of leaving them running."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _one_line(run: Callable[..., int], *args: Any) -> int:
    """A file-system error in a long-running command is one line too."""
    try:
        return run(*args)
    except OSError as exc:
        raise FedmedError(os_error_line(exc)) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Argument(help="TOML config (default: the quickstart settings).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override one value: section.key=value (repeatable).")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option("--out", help="Parent folder for the run directory (output.dir).")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Attach to a running Ray cluster HOST:PORT.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's own logs.")] = False,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue an interrupted simulated run (its directory) after its last finished round.")
    ] = None,
) -> None:
    """Train across simulated hospitals (or a baseline: federation.mode = pooled | local).
    Ctrl-C or SIGTERM stops the run, marked interrupted; --resume RUN continues it."""
    values: dict[str, str] = {}
    if out is not None:
        values["output.dir"] = str(out)
    if ray_address is not None:
        values["simulation.ray_address"] = ray_address
    if resume is not None and (config is not None or out is not None):
        _fail("--resume continues RUN with the settings and directory it started with: pass no config file and no --out")
    stopped: interrupt.Interrupted | None = None
    finished = False
    with interrupt.stop_on_signals(on_stop=_quiet_flower):
        try:
            _simulate(config, list(set_), values, resume, verbose)
            finished = True
        except interrupt.Stop as stop:  # outside the run's rounds
            when = "after the run finished" if finished else "before the run started"
            stopped = interrupt.Interrupted(f"interrupted ({interrupt.signal_name(stop.signum)}) {when}", stop.signum)
        except interrupt.Interrupted as exc:
            stopped = exc
        if stopped is not None:  # one line saying where the run stopped (a second signal is only recorded); exit 128 + the signal's number
            interrupt.say(str(stopped))
            _exit_now(stopped.code)


def _exit_now(code: int) -> None:
    """Exit at once, skipping the interpreter's teardown: a stopped run has written all it
    writes (atomically, fsynced), and the teardown (joining threads Flower left waiting on
    stopped Ray actors, modules' exit handlers) took over 10 s on a loaded machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _simulate(config: Path | None, overrides: list[str], values: dict[str, str], resume: Path | None, verbose: bool) -> None:
    from fedmed import config as config_mod

    if resume is not None:
        from fedmed.federation.simulation import resume_config, run_simulation
        from fedmed.run.directory import run_path

        cfg = resume_config(resume, overrides, values)
        run_simulation(cfg, verbose=verbose, resume=run_path(cfg))
        return
    cfg = config_mod.load(config, overrides, values)
    if cfg.federation.mode == "federated":
        from fedmed.federation.simulation import run_simulation

        run_simulation(cfg, verbose=verbose)
    else:
        from fedmed.baselines import run_baseline

        run_baseline(cfg)


def _quiet_flower() -> None:
    """Once a run is stopped, Flower's logs about the Ray actors stopped under it are noise."""
    import logging

    logging.getLogger("flwr").disabled = True


@app.command()
def sweep(
    study: Annotated[Path, typer.Argument(help="Study file: a fedmed config plus a [sweep] table.")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the cells and results (default: runs/studies/STUDY).")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Run every cell on this Ray cluster HOST:PORT.")] = None,
) -> None:
    """Run a study's grid (variants x grid x seeds), skipping cells already done, then write
    results.csv, results.md (mean ± std over seeds) and plots. The cells share one Ray
    runtime; Ctrl-C or SIGTERM stops the sweep, and running it again continues."""
    from fedmed.sweep import run_sweep

    target = out or Path("runs") / "studies" / study.stem
    try:
        run_sweep(study, target, ray_address)
    except interrupt.Interrupted as stopped:  # by a signal: one line, then exit at once, as `simulate` does
        with contextlib.suppress(OSError):  # after a hang-up there may be no terminal left to write to
            interrupt.say(str(stopped))
            _exit_now(stopped.code)
        os._exit(stopped.code)
    typer.echo(f"results: {target / 'results.md'}, {target / 'results.csv'}, {target / 'final_accuracy.png'}")


@app.command()
def audit(
    paths: Annotated[list[Path], typer.Argument(help="A run directory, or ledger files (*.jsonl) and public keys (*.pub) from a deployment.")],
    empirical: Annotated[bool, typer.Option("--empirical", help="Also score the run's canaries: an empirical lower bound on epsilon.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for audit.json and audit.md (default: the run directory, else here).")] = None,
    data_secret: Annotated[
        Path | None, typer.Option("--data-secret", help="A hospital's NAME.data-secret, revealed by it: check its ledger's commitment to its data.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="With --data-secret: the hospital's site config (or the simulation's config; default: the run's).")
    ] = None,
    keys: Annotated[
        list[Path],
        typer.Option("--keys", help="Public keys to trust, from outside the run: its trust file (`fedmed simulate` prints it) or a PARTY.pub (repeatable)."),
    ] = [],  # noqa: B006
) -> None:
    """Verify a training's ledgers: chains and signatures, cross-recorded checkpoints, model
    digests, the figures the run reports, privacy claims (recomputed with dp-accounting) and
    leakage of patient data, against public keys from outside the run. Exit 0 when
    everything holds, 1 when problems were found or the keys came only from the run
    directory (not verified), 2 when the input is unusable."""
    from fedmed.audit.report import audit as run_audit

    raise typer.Exit(code=run_audit(paths, empirical=empirical, out_dir=out, data_secret=data_secret, data=data, keys=list(keys)))


@certs_app.command("init")
def certs_init(
    host: Annotated[list[str], typer.Option("--host", help="A name or IP address hospitals dial to reach the server (repeatable).")] = ["localhost", "127.0.0.1"],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.crt, server.key.")] = Path("server/certs"),
    days: Annotated[int, typer.Option("--days", help="Validity of the CA and server certificate.")] = 365,
) -> None:
    """The coordinating centre's step: create the federation's CA and the server's TLS
    certificate. Give every hospital ca.crt; keep ca.key and server.key on the server."""
    from fedmed.deployment.certs import init_federation

    files = init_federation(out, list(host), days)
    typer.echo(f"wrote {files.ca_cert} (give it to every hospital), {files.server_cert}; private keys {files.ca_key}, {files.server_key} (mode 0600)")


@certs_app.command("site")
def certs_site(
    name: Annotated[str, typer.Argument(help="The hospital's name in the federation, e.g. hospital-02.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME.key and NAME.pub.")] = Path("sites/keys"),
) -> None:
    """The hospital's step: create its node's key pair. NAME.key never leaves this machine;
    send NAME.pub to the server's operator to enrol the node."""
    from fedmed.deployment.certs import site_keys

    private, public = site_keys(out, name)
    typer.echo(f"wrote {private} (mode 0600; stays here) and {public} (send it to the server's operator)")


@data_app.command("make-demo")
def make_demo(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the hospitals' images into.")],
    config: Annotated[Path | None, typer.Option("--config", help="TOML config whose [data] and seed to use.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override one value: section.key=value.")] = [],  # noqa: B006
) -> None:
    """Write the demo hospitals as PNGs in the Kaggle layout, plus a contact sheet."""
    from fedmed import config as config_mod
    from fedmed.data.export import export_demo

    cfg = config_mod.load(config, list(set_))
    sheet = export_demo(cfg, out_dir)
    typer.echo(f"wrote {out_dir} (contact sheet: {sheet})")


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="The dataset: a folder, or an .npz file.")],
    format_: Annotated[str, typer.Option("--format", help="auto | imagefolder | nifti | dicom | npz")] = "auto",
    config: Annotated[Path | None, typer.Option("--config", help="TOML config whose [data] settings to use.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override one value: section.key=value.")] = [],  # noqa: B006
    strict: Annotated[bool, typer.Option("--strict", help="Fail if any file had to be skipped.")] = False,
) -> None:
    """Validate a dataset before training on it: counts per class and split, image sizes,
    intensities, duplicates, imbalance, and every file skipped with the reason.
    Exit 0 when the data is usable, 2 (with the reason) when it is not."""
    from rich.console import Console

    from fedmed import config as config_mod
    from fedmed.data.check import check

    values = {"data.source": "disk", "data.path": str(path), "data.format": format_}
    if strict:
        values["data.strict"] = True
    cfg = config_mod.load(config, list(set_), values)
    check(cfg.data, cfg.skew, cfg.seed, Console())


@server_app.command("start")
def server_start(
    config: ConfigOption = Path("server/federation.toml"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the last run after its last finished round.")] = False,
    set_: SetOption = [],  # noqa: B006
) -> None:
    """Start the SuperLink (TLS, node authentication), enrol the hospitals in
    server.enrolled, run the federation and watch it to the end."""
    from rich.console import Console

    from fedmed import config as config_mod
    from fedmed.deployment import server

    _stop_on_sigterm()
    raise typer.Exit(_one_line(server.start, config_mod.load(config, list(set_)), resume, Console(highlight=False, soft_wrap=True)))


@server_app.command("status")
def server_status(config: ConfigOption = Path("server/federation.toml")) -> None:
    """The hospitals the server knows (online or not) and the current run's progress."""
    from rich.console import Console

    from fedmed import config as config_mod
    from fedmed.deployment import server

    raise typer.Exit(server.status(config_mod.load(config), Console(highlight=False, soft_wrap=True)))


@site_app.command("start")
def site_start(config: ConfigOption, set_: SetOption = []) -> None:  # noqa: B006
    """Check the site config, the data, the certificate and the server, then run this
    hospital's node until Ctrl-C."""
    from rich.console import Console

    from fedmed import config as config_mod
    from fedmed.deployment import site

    _stop_on_sigterm()
    raise typer.Exit(_one_line(site.start, config_mod.load(config, list(set_)), config, Console(highlight=False, soft_wrap=True)))


@site_app.command("budget")
def site_budget(config: ConfigOption, set_: SetOption = []) -> None:  # noqa: B006
    """This hospital's lifetime privacy budget: epsilon spent and left on each dataset it
    trained on with DP-SGD, over every run, and the runs that spent it."""
    from rich.console import Console

    from fedmed import config as config_mod
    from fedmed.deployment import budget

    raise typer.Exit(_one_line(budget.report, config_mod.load(config, list(set_)), config, Console(highlight=False, soft_wrap=True)))


@app.command()
def report(run: Path = typer.Argument(..., help="A finished run's directory.")) -> None:
    """Draw RUN/report.html: learning curves, the final model's confusion matrix, ROC curves
    and calibration, fairness across hospitals, privacy spent, the data, timing and the
    settings that differ from the defaults; one page that opens from disk."""
    from fedmed.report import write_report

    if not run.is_dir():
        raise FedmedError(f"{run} is not a folder: give a run directory (output.dir/<run name>)")
    typer.echo(f"report: {write_report(run)}")


@app.command("model-digest")
def model_digest(config: ConfigOption = Path("server/federation.toml")) -> None:
    """The SHA-256 of the model architecture a config trains: what a hospital lists in
    site.models to accept it."""
    from fedmed import config as config_mod
    from fedmed.ledger.digests import architecture_digest
    from fedmed.models import build_model

    cfg = config_mod.load(config)
    typer.echo(architecture_digest(build_model(cfg.model, cfg.data.num_classes, seed=0)))


def main() -> None:
    try:
        app()
    except FedmedError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a full disk, a folder that cannot be written: the user's to fix
        typer.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
