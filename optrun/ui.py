"""Terminal output of `optrun run`: a progress bar per stage, a training bar, and the summary
table at the end. Kept apart from the runtime so the pod (which logs) never draws bars.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from optrun.api.result import Result, TestResult
from optrun.api.v1alpha1 import OptimizationRunSpec

if TYPE_CHECKING:
    from optrun.runtime.training.loop import Trainer

STAGE_TITLES = {
    "detect": "Hardware, model and data",
    "baseline": "Baseline (the model as given)",
    "kernels": "Kernels (measured, patched, parity)",
    "train": "Fine-tuning under safety gates",
    "rlvr": "RLVR (GRPO) on the trained model",
    "compression": "Compressing the trained model",
    "kvcache": "KV-cache sweep on the final model",
    "speedups": "Speedup matrix",
    "artifact": "Writing the model artifact",
    "acceptance": "Acceptance suite",
    "report": "Writing the report",
}
DECISION_STYLE = {"GO": "bold green", "CONDITIONAL_GO": "bold yellow", "NO_GO": "bold red"}


class ConsoleObserver:
    def __init__(
        self, spec: OptimizationRunSpec, *, quiet: bool = False, console: Console | None = None
    ) -> None:
        self.spec = spec
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=quiet,
        )
        self.tasks: dict[str, int] = {}
        self.metrics_address = ""

    def __enter__(self) -> ConsoleObserver:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def stage(self, name: str) -> None:
        total = 1
        if name == "acceptance":
            from optrun.runtime.acceptance import SUITE

            total = max(1, len(SUITE.applicable(self.spec)))
        self.tasks[name] = self.progress.add_task(STAGE_TITLES.get(name, name), total=total, info="")

    def stage_done(self, name: str, seconds: float) -> None:
        task = self.tasks[name]
        total = self.progress.tasks[task].total or 1
        self.progress.update(task, completed=total)

    def stage_skipped(self, name: str, reason: str) -> None:
        task = self.progress.add_task(
            f"[dim]{STAGE_TITLES.get(name, name)}[/]", total=1, info=f"skipped: {reason}"
        )
        self.progress.update(task, completed=1)

    def serving(self, address: str) -> None:
        self.metrics_address = address
        self.progress.console.print(f"Metrics: {address}")

    def step(self, trainer: Trainer) -> None:
        task = self.tasks["train"]
        loss = trainer.losses[-1][1] if trainer.losses else float("nan")
        acc = trainer.evals[-1]["accuracy"] if trainer.evals else 0.0
        self.progress.update(
            task,
            total=trainer.total_steps,
            completed=trainer.step,
            info=f"epoch {trainer.epoch + 1}/{self.spec.training.epochs} loss {loss:.3f} acc {acc:.3f}",
        )

    def test(self, result: TestResult) -> None:
        task = self.tasks["acceptance"]
        self.progress.advance(task)
        self.progress.update(task, info=f"{result.name}: {'pass' if result.passed else 'FAIL'}")


def summary(result: Result, out: Path, metrics_address: str, console: Console | None = None) -> None:
    c = console or Console()
    a = result.acceptance
    table = Table(title="Acceptance", show_lines=False)
    for col in ("test", "category", "critical", "result", "measured", "expected"):
        table.add_column(col)
    for t in result.tests:
        table.add_row(
            t.name,
            t.category.value,
            "yes" if t.critical else "",
            "[green]pass[/]" if t.passed else "[red]FAIL[/]",
            _short(t.measured),
            t.expected.describe() if t.expected else "",
        )
    c.print(table)
    if result.speedups:
        st = Table(title="Speedups (median of repeats, against the baseline)")
        for col in ("optimization", "median", "min", "max", "repeats"):
            st.add_column(col)
        for k, t in result.speedups.items():
            st.add_row(k, f"{t.median:.2f}x", f"{t.min:.2f}x", f"{t.max:.2f}x", str(t.repeats))
        c.print(st)
    details = result.details
    kernels = details.get("kernels", {}).get("choices") if isinstance(details.get("kernels"), dict) else None
    if kernels:
        c.print("Kernels chosen: " + ", ".join(f"{op}={v.get('choice')}" for op, v in kernels.items()))
    c.print(
        f"Hardware: {result.hardware.name} ({result.hardware.device}, class {result.hardware.device_class})"
    )
    c.print(
        f"Training: {result.training.epochs} epochs, {result.training.steps} steps, held-out loss "
        f"{result.training.final_loss:.3f}, accuracy {result.training.final_accuracy:.3f}"
    )
    c.print(f"Safety: trips {result.safety.trips or '{}'}, recoveries {result.safety.recoveries}")
    if result.artifact is not None:
        a_ = result.artifact
        c.print(
            f"Model artifact: {a_.path} ({a_.format}, {a_.size_bytes} bytes"
            + (f", quantized weights {a_.quantized_bytes} bytes" if a_.quantized_bytes else "")
            + f"), held-out loss {a_.held_out_loss:.4f}"
        )
    for r in result.recommendations:
        c.print(f"Recommendation: {r}")
    style = DECISION_STYLE[result.decision.value]
    c.print(
        f"Decision: [{style}]{result.decision.value}[/] — pass rate {a.pass_rate:.1%} ({a.passed}/{a.collected}), "
        f"score {result.score:.3f}, risk {result.risk_level}"
    )
    c.print(f"Report: {out / 'report.md'} and {out / 'report.json'}")
    if metrics_address:
        c.print(f"Metrics were served at {metrics_address}")


def _short(v: object) -> str:
    text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    return text if len(text) <= 40 else text[:37] + "..."
