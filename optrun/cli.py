"""The `optrun` command.

    optrun run FILE.yaml [--output DIR]   run an OptimizationRun on this machine (CPU or GPU)
    optrun validate FILE.yaml             check a manifest; every error names its field
    optrun crd                            print the CRD generated from the API models
    optrun example-model DIR              a small Hugging Face model and dataset to try optrun on
    optrun runtime --spec FILE ...        the entry point of the operator's runtime pod
    optrun operator                       the Kubernetes operator (needs the `operator` extra)

Exit codes of `run` (and `validate`), so a script can tell the outcomes apart:
    0  GO                      3  CONDITIONAL_GO            4  NO_GO
    1  the run crashed         2  invalid manifest or usage
    143 stopped by SIGTERM (a checkpoint was written; run again to resume)
`runtime` exits 0 whenever it wrote a result (the decision is in the result, not the code),
1 when it crashed and 143 when stopped: a non-zero exit tells the operator to retry.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from optrun.api.errors import ManifestError
from optrun.api.v1alpha1 import OptimizationRunSpec, parse_manifest

EXIT = {"GO": 0, "CONDITIONAL_GO": 3, "NO_GO": 4}
EXIT_CRASH, EXIT_INVALID, EXIT_TERM = 1, 2, 143
EXIT_HUNG = 124  # `optrun runtime`: its watchdog ended a hung process (as timeout(1) exits)

log = logging.getLogger("optrun")


def load_manifest(path: str) -> tuple[str, OptimizationRunSpec]:
    """Read and validate a manifest file; ManifestError lists every problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: not valid YAML: {exc}"]) from None
    if len(docs) != 1:
        raise ManifestError([f"{path}: expected exactly one OptimizationRun document, found {len(docs)}"])
    spec = parse_manifest(docs[0])
    return str(docs[0]["metadata"]["name"]), spec


def _load_or_report(path: str) -> tuple[str, OptimizationRunSpec] | None:
    """The manifest, or None after printing every problem (one field-named line each)."""
    try:
        return load_manifest(path)
    except ManifestError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        print(f"{path}: {len(exc.problems)} error(s); nothing was run", file=sys.stderr)
        return None


def _source_problems(spec: OptimizationRunSpec) -> list[str]:
    """The model and data checks that need the runtime (transformers, datasets); none for
    built-in names, and a note instead of a check where the runtime is not installed."""
    try:
        from optrun.runtime.lm.sources import check
    except ImportError as exc:
        log.warning("model and data sources not checked (the runtime extra is not installed: %s)", exc)
        return []
    return check(spec)


def _report_sources(path: str, problems: list[str]) -> int:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"{path}: {len(problems)} error(s) in the model or data; nothing was run", file=sys.stderr)
    return EXIT_INVALID


def policy_problems(spec: OptimizationRunSpec) -> list[str]:
    """What validating the acceptance policy needs the runtime for: overrides named against the
    registry of built-in tests, the baseline's file. ImportError without the runtime extra."""
    from optrun import judge
    from optrun.runtime.acceptance import SUITE
    from optrun.runtime.orchestrator import load_suite
    from optrun.runtime.report import baseline_problems

    load_suite()
    return judge.policy_problems(spec.acceptance, SUITE.names()) + baseline_problems(spec.acceptance)


def _report_policy(path: str, problems: list[str]) -> int:
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    print(f"{path}: {len(problems)} error(s) in the acceptance policy; nothing was run", file=sys.stderr)
    return EXIT_INVALID


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.file)
    if loaded is None:
        return EXIT_INVALID
    name, spec = loaded
    problems = _source_problems(spec)
    if problems:
        return _report_sources(args.file, problems)
    try:
        problems = policy_problems(spec)
    except ImportError as exc:
        log.warning("overrides of built-in tests not checked (the runtime extra is not installed: %s)", exc)
    if problems:
        return _report_policy(args.file, problems)
    enabled = [k for k, v in spec.optimizations.model_dump().items() if v.get("enabled")]
    print(
        f"{args.file}: valid OptimizationRun {name!r} (model {spec.workload.model_name}, "
        f"optimizations: {', '.join(enabled) or 'none'}, rlvr: {'on' if spec.rlvr.enabled else 'off'})"
    )
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from optrun.api.crd import render

    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _install_sigterm(stop: threading.Event, grace: float) -> None:
    """SIGTERM: ask training to checkpoint and stop; force the exit if that takes too long."""

    def handler(signum: int, frame: Any) -> None:
        log.warning("received signal %d: checkpointing, then exiting (at most %.0fs)", signum, grace)
        stop.set()
        timer = threading.Timer(grace, lambda: os._exit(EXIT_TERM))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handler)


def cmd_run(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.file)
    if loaded is None:
        return EXIT_INVALID
    name, spec = loaded
    from optrun.runtime.orchestrator import InvalidSource, RunOptions, execute
    from optrun.runtime.training.loop import Interrupted
    from optrun.ui import ConsoleObserver, summary

    problems = _source_problems(spec)
    if problems:
        return _report_sources(args.file, problems)
    problems = policy_problems(spec)
    if problems:
        return _report_policy(args.file, problems)
    if spec.world_size > 1 and "WORLD_SIZE" not in os.environ:
        return _run_distributed(args, name, spec)

    out = Path(args.output or Path("runs") / name)
    opts = RunOptions(
        output_dir=out,
        name=name,
        metrics_port=args.metrics_port,
        attempts=spec.backoff_limit + 1,
        device=args.device,
    )
    _install_sigterm(opts.stop, grace=float(os.environ.get("OPTRUN_TERM_GRACE", "30")))
    observer = ConsoleObserver(spec, quiet=args.quiet)
    try:
        with observer:
            result = execute(spec, opts, observer)
    except Interrupted as exc:
        print(f"stopped: {exc}. Run the same command again to resume.", file=sys.stderr)
        return EXIT_TERM
    except InvalidSource as exc:  # found only once loading began (e.g. too few tokens)
        return _report_sources(args.file, exc.problems)
    summary(result, out, observer.metrics_address)
    return EXIT[result.decision.value]


def _run_distributed(args: argparse.Namespace, name: str, spec: OptimizationRunSpec) -> int:
    """A multi-process run on this machine: torchrun starts processesPerNode ranks of `optrun
    runtime`; rank 0 writes the report, which is summarised here."""
    import subprocess

    from optrun.api.result import Result
    from optrun.runtime import distributed
    from optrun.ui import summary

    if spec.distributed.nodes > 1:
        print(
            f"error: spec.distributed.nodes: {spec.distributed.nodes} pods need a cluster (the operator starts one "
            "per node); allowed here: 1",
            file=sys.stderr,
        )
        return EXIT_INVALID
    out = Path(args.output or Path("runs") / name)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--name", name, "--metrics-port", str(args.metrics_port), "--metrics-addr", "127.0.0.1"]
    if args.device:
        extra += ["--device", args.device]
    command = distributed.launch_command(args.file, str(out), spec, extra)
    print(
        f"{spec.world_size} ranks ({spec.distributed.strategy}) through torchrun; every rank's log in {out}/ranks",
        file=sys.stderr,
    )
    done = subprocess.run(command, check=False)
    report = out / "report.json"
    if done.returncode == EXIT_TERM:
        return EXIT_TERM
    if done.returncode != 0 or not report.exists():
        print(
            f"the distributed run failed (torchrun exit {done.returncode}); logs in {out}/ranks",
            file=sys.stderr,
        )
        return EXIT_CRASH
    import json

    result = Result.model_validate(json.loads(report.read_text()))
    summary(result, out, "")
    return EXIT[result.decision.value]


def cmd_runtime(args: argparse.Namespace) -> int:
    """The pod's entry point: log lines, /metrics served, the result as the termination message."""
    from optrun.runtime.orchestrator import InvalidSource, RunOptions, execute, invalid_result
    from optrun.runtime.training.loop import Interrupted

    try:
        name, spec = load_manifest(args.spec)
    except ManifestError as exc:
        for line in exc.problems:
            log.error("invalid manifest: %s", line)
        return EXIT_INVALID

    def end_hung(reason: str) -> None:
        # A hung process cannot write its result; the reason goes where the operator reads it.
        if args.termination_log:
            with contextlib.suppress(OSError):
                Path(args.termination_log).write_text(reason)
        log.error("%s", reason)
        logging.shutdown()
        os._exit(EXIT_HUNG)

    opts = RunOptions(
        output_dir=Path(args.output),
        name=args.name or name,
        metrics_port=args.metrics_port,
        attempts=1,
        device=args.device,
        keep_serving=True,
        metrics_addr=args.metrics_addr,
        on_hang=end_hung,
    )
    _install_sigterm(opts.stop, grace=float(os.environ.get("OPTRUN_TERM_GRACE", "20")))
    problems = policy_problems(spec)
    try:
        if problems:  # an override of no built-in test: retrying would not help either
            raise InvalidSource(problems)
        result = execute(spec, opts)
    except Interrupted as exc:
        log.warning("%s", exc)
        return EXIT_TERM
    except InvalidSource as exc:
        # A model or dataset the run cannot use: retrying would not help, so the pod ends with a
        # result (NO_GO, the field-named problems as its failed test) instead of a crash.
        for line in exc.problems:
            log.error("invalid source: %s", line)
        result = invalid_result(spec, exc.problems)
    if result is None:  # a rank other than 0: its part (training) is done, rank 0 reports
        return 0
    message = result.compact()
    if args.termination_log:
        try:
            Path(args.termination_log).write_text(message)
        except OSError as exc:
            log.error("cannot write the termination message to %s: %s", args.termination_log, exc)
    log.info("decision %s (score %.3f); report in %s", result.decision.value, result.score, args.output)
    return 0


def cmd_example_model(args: argparse.Namespace) -> int:
    from optrun.runtime.lm.example import make_example

    made = make_example(Path(args.directory), args.family)
    print(
        f"model:   {made['model']}  (a random {args.family} model and its tokenizer, as save_pretrained writes them)"
    )
    print(f"dataset: {made['dataset']}  (CPython's documentation, one JSON object per topic)")
    print("Run it: optrun run examples/hf-local.yaml  (its paths point at examples/hf-local/)")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    try:
        from optrun.operator import main as operator_main
    except ImportError as exc:
        print(
            f"the operator needs the 'operator' extra (pip install 'optrun[operator]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_CRASH
    return int(operator_main.run(args.rest) or 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="optrun", description="GPU optimization runs, on a laptop or in Kubernetes."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an OptimizationRun manifest on this machine")
    r.add_argument("file", help="OptimizationRun YAML")
    r.add_argument("--output", help="report and checkpoint directory (default runs/<name>)")
    r.add_argument("--metrics-port", type=int, default=0, help="port for /metrics (0: any free port)")
    r.add_argument("--device", choices=["cpu", "cuda"], help="override device detection")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="validate a manifest")
    v.add_argument("file")
    v.set_defaults(fn=cmd_validate)

    c = sub.add_parser("crd", help="print the generated CustomResourceDefinition")
    c.add_argument("--output", help="write to this file instead of stdout")
    c.set_defaults(fn=cmd_crd)

    rt = sub.add_parser("runtime", help="the runtime pod's entry point")
    rt.add_argument("--spec", required=True, help="OptimizationRun YAML (mounted from the run's ConfigMap)")
    rt.add_argument("--output", required=True, help="checkpoint and report directory (the checkpoint volume)")
    rt.add_argument("--name", help="run name (default: metadata.name of the manifest)")
    rt.add_argument("--metrics-port", type=int, default=9090)
    rt.add_argument(
        "--metrics-addr",
        default="0.0.0.0",
        help="address /metrics listens on (the pod IP where pods share a network namespace)",
    )
    rt.add_argument("--termination-log", default="/dev/termination-log")
    rt.add_argument("--device", choices=["cpu", "cuda"])
    rt.set_defaults(fn=cmd_runtime)

    e = sub.add_parser(
        "example-model", help="write a small Hugging Face model and a dataset to try optrun on"
    )
    e.add_argument("directory", help="where to write model/ and data/train.jsonl")
    e.add_argument("--family", choices=["llama", "qwen2", "mistral"], default="llama")
    e.set_defaults(fn=cmd_example_model)

    o = sub.add_parser("operator", help="run the Kubernetes operator")
    o.add_argument("rest", nargs=argparse.REMAINDER, help="options for the operator")
    o.set_defaults(fn=cmd_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:
        # Everything after `operator` belongs to the operator's own parser, flags included
        # (argparse's REMAINDER refuses a leading `--flag`).
        args = parser().parse_args(["operator"])
        args.rest = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    else:
        args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "run" and not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # progress bars speak for the run
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
