"""Command line of the runner. Only this module decides what is fatal and how it is printed."""

from __future__ import annotations

import argparse
import logging
import sys

from trainer import exit_codes
from trainer.config import ConfigError, load_config, runner_issues


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="oomlens instrumented training runner")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train with memory recording; prints the run id first")
    run.add_argument("--config", help="YAML run config (defaults are used for keys it leaves out)")
    run.add_argument("--db", help="SQLAlchemy URL (default: $OOMLENS_DB_URL or sqlite under $OOMLENS_WORKSPACE)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.max_steps=5 (repeatable; values are YAML)",
    )
    run.add_argument("--name", help="a label for the run")
    run.add_argument("--parent", type=int, help="the run this one was derived from")

    check = commands.add_parser("validate", help="validate a config and print it in full as YAML")
    check.add_argument("--config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    runs = commands.add_parser("runs", help="list recorded runs, newest first")
    runs.add_argument("--db")
    show = commands.add_parser("show", help="print a run's status and per-step memory")
    show.add_argument("run", help="a run id, or 'latest'")
    show.add_argument("--db")

    postmortem = commands.add_parser("postmortem", help="print a run's out-of-memory post-mortem")
    postmortem.add_argument("run", help="a run id, or 'latest' (the newest post-mortem)")
    postmortem.add_argument("--db")
    postmortem.add_argument("--json", action="store_true", help="machine-readable, every field")

    worker = commands.add_parser("_worker", help=argparse.SUPPRESS)
    worker.add_argument("--run-id", type=int, required=True)
    worker.add_argument("--db", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migration chatter on every open
    if args.command == "_worker":
        from trainer.worker import run_worker

        return run_worker(args.run_id, args.db)
    if args.command in ("runs", "show"):
        return _report(args)
    if args.command == "postmortem":
        return _postmortem(args)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(cfg.to_yaml(), end="")
            issues = runner_issues(cfg)
            if issues:
                lines = "\n".join(f"  - {issue}" for issue in issues)
                print(f"valid for estimates, but the runner cannot train it here:\n{lines}", file=sys.stderr)
            return exit_codes.COMPLETED
        from db import default_db_url
        from trainer.launcher import launch

        return launch(cfg, args.db or default_db_url(), name=args.name, parent_run_id=args.parent)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return exit_codes.INVALID_CONFIG


def _is_run_reference(text: str) -> bool:
    if text == "latest" or text.isdigit():
        return True
    print(f"run must be an id or 'latest', got {text!r}", file=sys.stderr)
    return False


def _newest(records: list):
    return records[0] if records else None


def _report(args: argparse.Namespace) -> int:
    from db import default_db_url, open_engine
    from db.queries import get_run, list_runs, step_samples
    from trainer.report import run_line, run_report

    engine = open_engine(args.db or default_db_url())
    if args.command == "runs":
        for run in list_runs(engine):
            print(run_line(run))
        return exit_codes.COMPLETED
    if not _is_run_reference(args.run):
        return exit_codes.INVALID_CONFIG
    run = _newest(list_runs(engine, limit=1)) if args.run == "latest" else get_run(engine, int(args.run))
    if run is None:
        print(f"no run {args.run} in {engine.url}", file=sys.stderr)
        return exit_codes.FAILED
    print(run_report(run, step_samples(engine, run.id)))
    return exit_codes.COMPLETED


def _postmortem(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from db import default_db_url, open_engine
    from db.queries import get_postmortem, list_postmortems
    from trainer.report import postmortem_report

    engine = open_engine(args.db or default_db_url())
    if not _is_run_reference(args.run):
        return exit_codes.INVALID_CONFIG
    if args.run == "latest":
        record = _newest(list_postmortems(engine, limit=1))
    else:
        record = get_postmortem(engine, int(args.run))
    if record is None:
        print(f"no post-mortem for run {args.run} (only runs that ran out of memory have one)", file=sys.stderr)
        return exit_codes.FAILED
    from db.queries import get_run
    from diagnosis.failed_request import request_sentence
    from diagnosis.suggest import evidence_for_run, failed_request_matches, suggest

    run = get_run(engine, record.run_id)
    data = dataclasses.asdict(record)
    evidence = evidence_for_run(data, run.config if run else None, run.environment if run else None)
    fixes = suggest(evidence)
    request = failed_request_matches(evidence)
    if args.json:
        named = {"failed_request": [match.to_json() for match in request]}
        print(json.dumps({**data, **named, "suggestions": [fix.to_json() for fix in fixes]}, indent=2, default=list))
    else:
        print(postmortem_report(record, fixes, request_sentence(record.requested_bytes, request)))
    return exit_codes.COMPLETED
