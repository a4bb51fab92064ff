"""`python -m diagnosis parse|suggest|estimate|fit|snapshot`: the engine for people with a log.

The JSON shapes are a contract other tools depend on (issue #4): keep the key names. Exit codes:
0 answered (also for "not an OOM message": that is an answer), 2 bad input (unreadable file,
invalid config, unknown GPU), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from diagnosis.units import GIB, human_bytes

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
# A pasted log bigger than this is refused rather than read into memory.
MAX_TEXT_BYTES = 64 * 1024**2


class InputError(ValueError):
    """Input the user can fix: the message says how."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diagnosis", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    parse = commands.add_parser("parse", help="read the numbers out of an OOM message or log")
    parse.add_argument("file", nargs="?", default="-", help="a log file, or - for standard input")
    parse.add_argument("--json", action="store_true")

    suggest = commands.add_parser("suggest", help="ranked fixes for an OOM log, a post-mortem or a config")
    suggest.add_argument("file", nargs="?", help="an OOM log, a post-mortem JSON (trainer postmortem --json), or -")
    suggest.add_argument("--config", help="the run's config YAML: savings become estimator what-ifs")
    suggest.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    suggest.add_argument("--run", help="a recorded run id or 'latest': its post-mortem and config")
    suggest.add_argument("--snapshot", help="a PyTorch memory snapshot of the failure (loaded safely)")
    suggest.add_argument("--db", help="database URL for --run (default: the workspace's SQLite file)")
    _add_capacity(suggest)
    suggest.add_argument("--torch-version", help="the torch that ran (decides the allocator setting)")
    _add_bitsandbytes(suggest)
    _add_transformers(suggest)
    suggest.add_argument("--json", action="store_true")

    estimate = commands.add_parser("estimate", help="a config's peak memory per training step")
    estimate.add_argument("--config", help="run config YAML (defaults for missing keys)")
    estimate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_capacity(estimate)
    estimate.add_argument("--traced", action="store_true", help="trace the real model under fake tensors (slower)")
    estimate.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    estimate.add_argument(
        "--torch-version",
        help="the torch that runs the step (its cuBLAS workspaces and SDPA kernels); default: the one installed",
    )
    _add_bitsandbytes(estimate)
    _add_transformers(estimate)
    estimate.add_argument(
        "--first-micro-batch",
        action="store_true",
        help="the run's first micro-batch, before optimizer states, accumulated gradients or a graph the loop "
        "still holds exist (where a run that feeds its longest batch first peaks); analytic only",
    )
    estimate.add_argument("--json", action="store_true")

    fit = commands.add_parser("fit", help="the longest sequence / largest micro-batch that fits")
    fit.add_argument("--config")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_capacity(fit)
    fit.add_argument("--knob", choices=("data.seq_len", "train.micro_batch_size"), default="data.seq_len")
    fit.add_argument("--json", action="store_true")

    snapshot = commands.add_parser("snapshot", help="summarise a PyTorch memory snapshot pickle (safely)")
    snapshot.add_argument("file")
    snapshot.add_argument("--max-mb", type=float, default=1024, help="refuse files larger than this")
    snapshot.add_argument("--json", action="store_true")
    return parser


def _add_bitsandbytes(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--bitsandbytes-version",
        help="the bitsandbytes that runs a 4-bit step (before 0.43.2 it keeps more); default: the one installed",
    )


def _add_transformers(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--transformers-version",
        help="the transformers that runs the step (before 5.0 it checkpoints reentrantly, before 4.49 its loss "
        "copies the logits, before 4.53 GPTBigCode keeps a cache in training and from 4.54 to 5.0 does not "
        "checkpoint); default: the one installed",
    )


def _add_capacity(sub: argparse.ArgumentParser) -> None:
    group = sub.add_mutually_exclusive_group()
    group.add_argument("--capacity-gb", type=float, help="device memory in GiB")
    group.add_argument("--gpu", help="a card name, e.g. A100-80GB, H100, RTX-4090")


def _read_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read(MAX_TEXT_BYTES + 1)[:MAX_TEXT_BYTES]
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source!r} does not exist or is not a file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise InputError(
            f"{source!r} is {human_bytes(path.stat().st_size)}; logs over {human_bytes(MAX_TEXT_BYTES)} "
            "are refused: cut the part around the error"
        )
    return path.read_text(errors="replace")


def _capacity(args: argparse.Namespace) -> int | None:
    if getattr(args, "capacity_gb", None) is not None:
        if args.capacity_gb <= 0:
            raise InputError("--capacity-gb must be positive")
        return int(args.capacity_gb * GIB)
    if getattr(args, "gpu", None):
        from diagnosis.gpus import gpu_capacity_bytes

        try:
            return gpu_capacity_bytes(args.gpu)
        except KeyError as error:
            raise InputError(str(error.args[0] if error.args else error)) from None
    return None


def _config(args: argparse.Namespace, required: bool = False):
    from trainer.config import load_config

    if args.config is None and not args.overrides and not required:
        return None
    return load_config(args.config, args.overrides)


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=False) if as_json else text)


# --- commands ---------------------------------------------------------------------------------------


def _cmd_parse(args: argparse.Namespace) -> int:
    from diagnosis.oom_text import not_oom_json, parse_oom_messages

    messages = parse_oom_messages(_read_text(args.file))
    if not messages:
        _emit(not_oom_json(), args.json, "not an OOM message")
        return EXIT_OK
    data = messages[0].to_json()
    if len(messages) > 1:
        data["messages"] = [m.to_json() for m in messages]
    _emit(data, args.json, "\n\n".join(_message_text(m) for m in messages))
    return EXIT_OK


def _message_text(m) -> str:
    rows = [
        ("backend", m.backend),
        ("device", m.device),
        ("rank", m.rank),
        ("requested", human_bytes(m.requested_bytes)),
        ("total", human_bytes(m.total_bytes)),
        ("free", human_bytes(m.free_bytes)),
        ("allocated by PyTorch", human_bytes(m.allocated_bytes)),
        ("reserved by PyTorch", human_bytes(m.reserved_bytes)),
        ("reserved but unallocated", human_bytes(m.reserved_unallocated_bytes)),
        ("outside PyTorch", human_bytes(m.outside_pytorch_bytes)),
        ("where", m.location),
    ]
    rows += [(f"process {p.pid}", human_bytes(p.bytes)) for p in m.process_bytes]
    return "\n".join(f"{name:<26}{value}" for name, value in rows if value not in (None, "n/a"))


def _cmd_suggest(args: argparse.Namespace) -> int:
    from diagnosis.failed_request import request_sentence
    from diagnosis.oom_text import parse_oom
    from diagnosis.suggest import Evidence, failed_request_matches, requested_bytes, suggest, suggestions_json

    cfg = _config(args)
    message = postmortem = None
    torch_version, bitsandbytes = args.torch_version, args.bitsandbytes_version
    transformers = args.transformers_version
    if args.run:
        recorded = _recorded(args.run, args.db)
        cfg, message, postmortem = cfg or recorded.config, recorded.message, recorded.postmortem
        torch_version = torch_version or recorded.torch_version
        bitsandbytes = bitsandbytes or recorded.bitsandbytes_version
        transformers = transformers or recorded.transformers_version
    if args.file:
        text = _read_text(args.file)
        document = _json_document(text)
        if document is not None and "error_text" in document:
            postmortem = document
            message = parse_oom(document.get("error_text") or "")
        else:
            message = parse_oom(text)
    snapshot = None
    if args.snapshot:
        from diagnosis.snapshot import read_snapshot

        snapshot = read_snapshot(args.snapshot).to_json()
    if message is None and postmortem is None and cfg is None and snapshot is None:
        _emit(
            {"suggestions": [], "note": "not an OOM message, and no config to estimate"},
            args.json,
            "Not an OOM message, and no --config to estimate: nothing to suggest.",
        )
        return EXIT_OK
    evidence = Evidence(
        cfg, message, postmortem, snapshot, _capacity(args), torch_version, bitsandbytes, transformers, args.gpu
    )
    items = suggest(evidence)
    request = failed_request_matches(evidence)
    text = "\n".join(
        f"{i}. [{s.category}] {s.change}\n   saves {human_bytes(s.saves_bytes)}"
        f"{'' if s.helps else ' (cannot help)'}, {s.confidence} confidence: {s.why}"
        for i, s in enumerate(items, 1)
    )
    named = request_sentence(requested_bytes(evidence), request)
    text = "\n".join(part for part in (named, text or "No suggestion applies.") if part)
    document = {**suggestions_json(items), "failed_request": [match.to_json() for match in request]}
    _emit(document, args.json, text)
    return EXIT_OK


def _json_document(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _recorded(run: str, db_url: str | None):
    """Evidence for a recorded run: its post-mortem, config and torch version."""
    import dataclasses

    from db import default_db_url, open_engine
    from db.queries import get_postmortem, get_run, list_postmortems
    from diagnosis.suggest import evidence_for_run

    engine = open_engine(db_url or default_db_url())
    if run == "latest":
        found = list_postmortems(engine, limit=1)
        record = found[0] if found else None
    elif run.isdigit():
        record = get_postmortem(engine, int(run))
    else:
        raise InputError(f"--run must be a run id or 'latest', got {run!r}")
    if record is None:
        raise InputError(f"no post-mortem for run {run} (only runs that ran out of memory have one)")
    run_record = get_run(engine, record.run_id)
    config = run_record.config if run_record else None
    environment = run_record.environment if run_record else None
    return evidence_for_run(dataclasses.asdict(record), config, environment)


def _estimate(
    cfg, traced: bool, device: str, versions: dict[str, str | None], gpu: str | None = None, first: bool = False
):
    if traced:
        if first:
            raise InputError("--first-micro-batch is analytic only: the traced estimate steps a steady-state one")
        from diagnosis.traced import estimate_traced

        return estimate_traced(cfg, device=device, gpu=gpu, **versions)
    from diagnosis.analytic import estimate_analytic

    return estimate_analytic(cfg, device=device, gpu=gpu, first_micro_batch=first, **versions)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from diagnosis.accuracy import measured_error, trust_text

    cfg = _config(args, required=True)
    capacity = _capacity(args)
    versions = {
        "bitsandbytes": args.bitsandbytes_version,
        "transformers": args.transformers_version,
        "torch": args.torch_version,
    }
    result = _estimate(cfg, args.traced, args.device, versions, args.gpu, args.first_micro_batch)
    data = result.to_json(capacity)
    step = ", first micro-batch" if args.first_micro_batch else ""
    lines = [
        f"peak allocated  {human_bytes(result.peak_allocated_bytes)}  ({result.mode}{step}, at {result.peak_phase})"
    ]
    lines += [f"  {key:<18}{human_bytes(value)}" for key, value in data["breakdown"].items()]
    lines.append(f"peak reserved   {human_bytes(result.peak_reserved_bytes)}")
    lines.append(f"device          {human_bytes(result.device_bytes)}")
    if capacity is not None:
        verdict = "fits" if data["fits"] else "does NOT fit"
        lines.append(f"capacity        {human_bytes(capacity)}: {verdict}")
    lines += [f"note: {note}" for note in result.notes]
    trust = trust_text(measured_error()) if result.mode == "analytic" else None
    if trust:
        lines.append(f"accuracy: {trust}")
    _emit(data, args.json, "\n".join(lines))
    return EXIT_OK


def _cmd_fit(args: argparse.Namespace) -> int:
    from diagnosis.fit import largest_fitting

    cfg = _config(args, required=True)
    capacity = _capacity(args)
    if capacity is None:
        raise InputError("fit needs --capacity-gb or --gpu")
    result = largest_fitting(cfg, capacity, args.knob)
    if result.value is None:
        text = f"Nothing fits in {human_bytes(capacity)}: {result.reason}"
    else:
        peak = f" (device {human_bytes(result.estimate.device_bytes)})" if result.estimate else ""
        text = f"Largest {args.knob} that fits in {human_bytes(capacity)}: {result.value:,}{peak}\n  {result.reason}"
    _emit(result.to_json(), args.json, text)
    return EXIT_OK


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from diagnosis.snapshot import read_snapshot

    summary = read_snapshot(args.file, max_bytes=int(args.max_mb * 1024**2))
    _emit(summary.to_json(), args.json, _snapshot_text(summary))
    return EXIT_OK


_SHOWN_SITES = 8
_SHOWN_BLOCKS = 5
_SHOWN_OOM_FRAMES = 3


def _frame_text(frame) -> str:
    """`eager_attention_forward (transformers/models/llama/modeling_llama.py:204)`: a library's
    path from its package on, as a reader looks it up."""
    filename = frame.filename.split("site-packages/")[-1]
    return f"{frame.name} ({filename}:{frame.line})"


def _snapshot_text(summary) -> str:
    """What `--json` holds, for a person: the state at the dump, the trace's peaks, each OOM with
    where it was asked for, where the live bytes were allocated, the largest blocks."""
    lines = [summary.headline]
    for device in summary.devices:
        t = device.totals
        lines += [
            "",
            f"device {device.device} at the snapshot: {t.segments} segments ({t.large_segments} large, "
            f"{t.small_segments} small, {t.expandable_segments} expandable)",
            f"  {'reserved':<24}{human_bytes(t.reserved_bytes)}",
            f"  {'allocated':<24}{human_bytes(t.allocated_bytes)}",
            f"  {'free (cached)':<24}{human_bytes(t.free_bytes)}, {human_bytes(t.split_free_bytes)} of it in split "
            f"segments; largest free block {human_bytes(t.largest_free_block_bytes)}",
        ]
        timeline = device.timeline
        if timeline is not None and timeline.events:
            peaks = human_bytes(max(timeline.allocated_bytes)), human_bytes(max(timeline.reserved_bytes))
            lines.append(
                f"  over the trace ({timeline.events:,} events): peak allocated {peaks[0]}, peak reserved {peaks[1]}"
            )
    for oom in summary.ooms:
        free = f", {human_bytes(oom.device_free_bytes)} free on the device" if oom.device_free_bytes is not None else ""
        lines += [
            "",
            f"out of memory on device {oom.device}: asked for {human_bytes(oom.requested_bytes)} with "
            f"{human_bytes(oom.allocated_bytes)} allocated and {human_bytes(oom.reserved_bytes)} reserved{free}",
        ]
        lines += [f"  at {_frame_text(frame)}" for frame in oom.frames[:_SHOWN_OOM_FRAMES]]
        if oom.user_frame is not None and oom.user_frame not in oom.frames[:_SHOWN_OOM_FRAMES]:
            lines.append(f"  from {_frame_text(oom.user_frame)}")
    if summary.top_sites:
        lines += ["", f"live bytes by allocation site ({summary.site_source}):"]
        lines += [
            f"  {human_bytes(site.bytes):>10}  {site.count:>6,} block(s)  {site.label}"
            for site in summary.top_sites[:_SHOWN_SITES]
        ]
        if summary.unattributed_bytes:
            lines.append(f"  {human_bytes(summary.unattributed_bytes):>10}  with no frame recorded")
    if summary.largest_blocks:
        lines += ["", "largest blocks:"]
        lines += [
            f"  {human_bytes(block.size_bytes):>10}  {block.state}, {block.segment_type or 'segment'} pool"
            + (f"  {_frame_text(block.user_frame)}" if block.user_frame else "")
            for block in summary.largest_blocks[:_SHOWN_BLOCKS]
        ]
    settings = summary.allocator_settings
    if settings:
        lines += [
            "",
            f"allocator settings: expandable_segments {settings.get('expandable_segments')}, max_split_size "
            f"{settings.get('max_split_size')}, PYTORCH_CUDA_ALLOC_CONF {settings.get('PYTORCH_CUDA_ALLOC_CONF')!r}",
        ]
    return "\n".join(lines)


_COMMANDS = {
    "parse": _cmd_parse,
    "suggest": _cmd_suggest,
    "estimate": _cmd_estimate,
    "fit": _cmd_fit,
    "snapshot": _cmd_snapshot,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from trainer.config import ConfigError

    errors: list[type[BaseException]] = [InputError, ConfigError]
    try:
        from diagnosis.safe_pickle import SnapshotError

        errors.append(SnapshotError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from diagnosis.traced import TracedEstimateUnsupported

        errors.append(TracedEstimateUnsupported)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except _user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
