"""The ``harness`` command line: list plugins, run sweeps, print reports.

    harness methods                         registered methods (built-in and plugins)
    harness sweep CONFIG [key=value ...]    plan, run and report a sweep (--dry-run, --status,
                                            --launcher local|slurm, --no-wait)
    harness report RUN_DIR|CONFIG           Table 1 from the results store (--compare published,
                                            --format md,csv,tex,html,png, --out DIR, --alpha A)

Errors in configs, names or data paths print one line naming the file, key or value at fault
and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.markup import escape as rich_escape

from harness.config import ClusterError, ConfigError
from harness.registry import RegistryError

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err_console = Console(stderr=True, soft_wrap=True)

USER_ERRORS = (ConfigError, RegistryError, FileNotFoundError, NotADirectoryError, ValueError, ClusterError)


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from harness.registry import METHODS

    table = Table(title="Registered methods")
    for col in ("name", "group", "consumes", "source"):
        table.add_column(col)
    broken = 0
    for name in METHODS.names():
        try:
            cls = METHODS.get(name)
        except Exception as exc:  # a broken plugin is listed with its error; the others still show
            broken += 1
            table.add_row(name, "[red]broken[/red]", f"[red]{type(exc).__name__}: {exc}[/red]", METHODS.origin(name))
            continue
        table.add_row(name, cls.group, ", ".join(cls.consumes) or "—", METHODS.origin(name))
    console.print(table)
    return 1 if broken else 0


def _load(args: argparse.Namespace):
    from harness.config import load_sweep

    return load_sweep(args.config, args.overrides, methods=_names(args.methods), columns=_names(args.columns))


def _names(value: Optional[str]) -> Optional[List[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _sweep_command(args: argparse.Namespace, *extra: str) -> str:
    """This sweep's command line again, quoted for a shell (overrides hold brackets and spaces)."""
    import shlex

    words = ["harness", "sweep", str(args.config), *args.overrides]
    for flag in ("launcher", "methods", "columns"):
        if getattr(args, flag, None):
            words += [f"--{flag}", getattr(args, flag)]
    return shlex.join(words + list(extra))


def cmd_sweep(args: argparse.Namespace) -> int:
    from harness.report import build_table, print_report, write_report
    from harness.store import Store
    from harness.sweep import make_plan

    sweep = _load(args)
    if args.launcher:
        sweep.cfg.launcher.name = args.launcher
    plan = make_plan(sweep)
    store = Store(sweep.run_dir)
    if args.status:
        from harness.launchers import slurm_queue_states
        from harness.status import print_status

        # Jobs this sweep has on SLURM (runs/<sweep>/slurm/jobs.json), whatever launcher is named now.
        print_status(plan, store, sweep, console, slurm_queue_states(plan, store))
        return 0
    from harness.launchers import LAUNCHERS, pending_jobs

    name = sweep.cfg.launcher.name
    if name not in LAUNCHERS:
        raise ConfigError(f"{args.config}: launcher.name {name!r} is unknown; known: {', '.join(LAUNCHERS)}")
    launcher = LAUNCHERS[name](getattr(sweep.cfg.launcher, name), console)
    if args.no_wait:
        if not hasattr(launcher, "wait"):
            raise ConfigError(f"--no-wait needs a launcher that submits to a scheduler (--launcher slurm), not {name!r}")
        launcher.wait = False
    if hasattr(launcher, "validate"):  # before anything is printed as planned or submitted
        launcher.validate(plan, sweep)
    if args.dry_run:
        from harness.status import print_plan

        rows, notes = launcher.describe(plan, store) if hasattr(launcher, "describe") else (None, ())
        print_plan(plan, store, sweep, console, rows, notes)
        return 0
    store.root.mkdir(parents=True, exist_ok=True)
    store.write_plan(plan.to_dict())
    todo = pending_jobs(plan, store)
    console.print(f"[bold]sweep[/bold] {sweep.name}: {len(plan.jobs)} jobs "
                  f"({len(plan.pretrain)} pre-training, {len(plan.finetune)} fine-tuning), "
                  f"{len(plan.jobs) - len(todo)} already done, results in {store.root}")
    outcome = launcher.run(plan, store)
    if outcome.submitted or outcome.attached:
        console.print(f"[bold]SLURM[/bold]: {len(outcome.submitted)} jobs submitted, {len(outcome.attached)} followed "
                      f"from an earlier launch; records in {store.root / 'slurm' / 'jobs.json'}", highlight=False)
    if not outcome.waited:
        stopped = getattr(launcher, "wait", False)  # asked to wait, but stopped (time limit, no squeue, Ctrl-C)
        console.print(("stopped following the jobs (they keep running)" if stopped else "not waiting for the jobs")
                      + f": follow them with [bold]{rich_escape(_sweep_command(args, '--status'))}"
                      "[/bold]; re-run this command to collect the report (and resubmit what failed)", highlight=False)
        return 1 if stopped else 0
    for jid, sec in outcome.seconds.items():
        console.print(f"  {jid}: {sec:.1f} s" + (f"  [red]failed[/red]: {outcome.failed[jid]}" if jid in outcome.failed
                                                 else ""), highlight=False)
    for jid, err in outcome.failed.items():
        if jid not in outcome.seconds:
            console.print(f"  {jid}: [red]failed[/red]: {err}", highlight=False)
    console.print(f"[bold]sweep wall time[/bold] {outcome.wall:.1f} s ({len(outcome.ran)} ran, "
                  f"{len(outcome.skipped)} reused, {len(outcome.failed)} failed)")
    if outcome.submitted or outcome.attached:
        console.print(f"SLURM: {len(outcome.submitted)} jobs submitted, {sum(outcome.requeues.values())} requeues "
                      f"survived ({len(outcome.requeues)} jobs), {len(outcome.lost)} jobs lost (left the queue "
                      "without a result)", highlight=False)
    report = sweep.cfg.report
    table = build_table(store.root, compare=report.compare)
    print_report(table, console)
    paths = write_report(table, store.root / "report", list(report.formats))
    _print_paths(paths)
    return 1 if outcome.failed else 0


def _print_paths(paths: Dict[str, Path]) -> None:
    if not paths:
        console.print("report: nothing written (no format asked for)")
        return
    folder = next(iter(paths.values())).parent
    console.print(f"report: {folder}/ " + " ".join(p.name for p in paths.values()), highlight=False)


def cmd_report(args: argparse.Namespace) -> int:
    """Table 1 of a run, complete or not: what is missing is listed, never an error."""
    from harness.report import ReportSettings, build_table, parse_formats, print_report, write_report
    from harness.store import Store

    target = Path(args.run)
    cfg_report: Dict[str, Any] = {}
    plan: Optional[Dict[str, Any]] = None
    if target.is_file():  # a sweep config: its cells (as its overrides make them) and its report settings
        from harness.config import load_sweep, to_plain
        from harness.sweep import make_plan

        sweep = load_sweep(target, args.overrides)
        target, cfg_report, plan = sweep.run_dir, to_plain(sweep.cfg.report), make_plan(sweep).to_dict()
    elif args.overrides:
        raise ValueError(f"key=value overrides ({' '.join(args.overrides)}) need the sweep YAML, not a run directory")
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: no such run directory (give runs/<sweep> or a sweep config)")
    plan = plan or Store(target).read_plan()
    if plan is None:
        raise FileNotFoundError(f"{target}: no plan.json; is this a sweep run directory (runs/<sweep>)?")
    settings_src = cfg_report or plan.get("report") or {}
    settings = ReportSettings.from_mapping(settings_src)
    if args.alpha is not None:
        if not 0.0 < args.alpha < 1.0:
            raise ValueError(f"--alpha must be in (0, 1), got {args.alpha}")
        settings.alpha = args.alpha
    compare = args.compare if args.compare is not None else settings_src.get("compare")
    formats = parse_formats(args.format if args.format is not None else settings_src.get("formats"))
    table = build_table(target, plan, settings=settings, compare=compare or None)
    print_report(table, console)
    paths = write_report(table, Path(args.out) if args.out else target / "report", formats)
    _print_paths(paths)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from harness.config import parse_overrides, to_plain
    from harness.data.prepare import prepare_command

    overrides = to_plain(parse_overrides(args.overrides)) if args.overrides else None
    prepare_command(args.dataset, args.root, cache_dir=args.cache_dir, overrides=overrides, force=args.force,
                    console=console, frames=not args.no_frames)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark harness for self-supervised 3D pre-training")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="list registered methods")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("sweep", help="run a sweep (pre-training + fine-tuning) and print Table 1")
    s.add_argument("config", help="sweep YAML, e.g. configs/sweeps/table1.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] methods.csc.steps=10")
    s.add_argument("--launcher", choices=["local", "slurm"], help="override launcher.name")
    s.add_argument("--dry-run", action="store_true", help="validate and print the job plan; submit nothing")
    s.add_argument("--status", action="store_true",
                   help="show each cell's state from the store and, for SLURM jobs, squeue/sacct")
    s.add_argument("--no-wait", action="store_true",
                   help="SLURM: submit and return without following the jobs (then use --status)")
    s.add_argument("--methods", metavar="A,B", help="only these methods (rows) of the sweep, e.g. scratch,csc")
    s.add_argument("--columns", metavar="X,Y", help="only these columns, e.g. scannet-semseg,s3dis-semseg")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("data", help="dataset utilities")
    data_sub = s.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser("prepare", help="validate a release and convert it once into the fast cache")
    d.add_argument("dataset", help="registered dataset name: scannet, s3dis, semantickitti, sunrgbd")
    d.add_argument("--root", help="the release in its official layout (default: the embedded miniature)")
    d.add_argument("--cache-dir", help="where the cache goes (default: the dataset config's cache_dir)")
    d.add_argument("--force", action="store_true", help="rebuild the cache even if it is complete")
    d.add_argument("--no-frames", action="store_true",
                   help="skip the RGB-D frames (ScanNet's .sens): enough for fine-tuning, not for pre-training")
    d.add_argument("overrides", nargs="*", help="dataset config overrides, e.g. frame_skip=25")
    d.set_defaults(func=cmd_data_prepare)

    from methods.image_guided.visualize import register_cli

    register_cli(sub)  # harness visualize features (the paper's Figure 2)

    s = sub.add_parser("report", help="print and write Table 1 of a run")
    s.add_argument("run", help="runs/<sweep> directory or the sweep's YAML")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the sweep YAML")
    s.add_argument("--compare", metavar="published|CSV",
                   help="put reproduced and published values side by side ('published' = the paper's Table 1)")
    s.add_argument("--format", metavar="FORMATS", help="comma-separated subset of md,csv,tex,html,png (default: all)")
    s.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/report)")
    s.add_argument("--alpha", type=float, help="significance level of the paired t-tests (default: report.alpha)")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after an option (e.g. --launcher slurm a.b=1)
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its message
        err_console.print(f"[bold red]error:[/bold red] {msg}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
