"""The report: `report.json` (the result contract), `report.md` (decision matrix, scorecard,
failures measured against expected, the user's own tests, the comparison with a baseline,
recommendations with the manifest change that applies each) and PNG plots (loss and accuracy
with the safety-gate events marked). The compact form of the result, for a pod's termination
message, is `Result.compact()`.

`load_baseline` reads what `spec.acceptance.baseline` names for the judge: a report.json path
(relative to the working directory), or, in the cluster, the earlier OptimizationRun's stored
result, which the operator mounts into the pod and names in `BASELINE_ENV`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from optrun.api.result import BASELINE_ENV, Result, TestResult
from optrun.api.v1alpha1 import Acceptance
from optrun.judge import Baseline
from optrun.runtime.context import RunContext

log = logging.getLogger(__name__)


def load_baseline(policy: Acceptance) -> Baseline | None:
    """The baseline the policy names, read for the judge; None without one. A baseline that
    cannot be read comes back with the reason, and fails the run's baseline.no-regression."""
    spec = policy.baseline
    if spec is None:
        return None
    if spec.report is not None:
        source, path = f"report: {spec.report}", spec.report
    else:
        source, path = f"run: {spec.run}", os.environ.get(BASELINE_ENV, "")
        if not path:
            return Baseline(source, error=_RUN_OUTSIDE_CLUSTER)
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        if spec.run is not None:
            return Baseline(
                source,
                error=f"{spec.run} has no stored result: it has not succeeded, or is no run of this namespace",
            )
        return Baseline(source, error=f"cannot read {path}: no such file")
    except (OSError, UnicodeDecodeError) as exc:
        return Baseline(source, error=f"cannot read {path}: {exc}")
    except json.JSONDecodeError as exc:
        return Baseline(source, error=f"{path} is not JSON: {exc.msg} at line {exc.lineno}")
    if not isinstance(doc, dict) or not ("figures" in doc or "tests" in doc):
        return Baseline(source, error=f"{path} is not a report.json (no figures, no tests)")
    return Baseline(source, result=doc)


_RUN_OUTSIDE_CLUSTER = (
    "baseline.run names an OptimizationRun, whose result the operator passes to the runtime pod; "
    "outside the cluster, name an earlier report.json with baseline.report"
)


def baseline_problems(policy: Acceptance) -> list[str]:
    """Field-named problems of spec.acceptance.baseline that can be seen before the run starts."""
    baseline = load_baseline(policy)
    if baseline is None or not baseline.error:
        return []
    spec = policy.baseline
    assert spec is not None
    if spec.report is not None:
        return [f"spec.acceptance.baseline.report: {spec.report!r}: {baseline.error}"]
    if not os.environ.get(BASELINE_ENV):
        return [f"spec.acceptance.baseline.run: {spec.run!r}: {_RUN_OUTSIDE_CLUSTER}"]
    return []  # in the pod: a run without a stored result fails baseline.no-regression instead


def write(out: Path, result: Result, ctx: RunContext) -> dict[str, str]:
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "training.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    train = ctx.results.get("train", {})
    plotted = plot_training(
        paths["plot"], train.get("losses", []), train.get("evals", []), result.safety.events
    )
    paths["markdown"].write_text(
        markdown(
            result,
            ctx.spec.workload.model_name,
            plots=["training.png"] if plotted else [],
            objective=ctx.spec.acceptance.objective,
        )
    )
    if not plotted:
        paths.pop("plot")
    return {k: str(v) for k, v in paths.items()}


def plot_training(
    path: Path, losses: list[tuple[int, float]], evals: list[dict[str, Any]], events: list[dict[str, Any]]
) -> bool:
    if not losses and not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in a pod
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        ax_loss.plot([s for s, _ in losses], [v for _, v in losses], lw=0.8, alpha=0.6, label="train loss")
    if evals:
        ax_loss.plot(
            [e["step"] for e in evals], [e["loss"] for e in evals], "o-", ms=3, label="held-out loss"
        )
        ax_acc.plot(
            [e["step"] for e in evals],
            [e["accuracy"] for e in evals],
            "o-",
            ms=3,
            color="tab:green",
            label="held-out accuracy",
        )
    for ev in events:
        if "step" in ev:
            for ax in (ax_loss, ax_acc):
                ax.axvline(ev["step"], color="tab:red", ls="--", lw=1)
            ax_loss.annotate(
                ev["gate"],
                (ev["step"], ax_loss.get_ylim()[1]),
                color="tab:red",
                fontsize=8,
                rotation=90,
                va="top",
            )
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax_acc.set(xlabel="step", ylabel="next-token accuracy", title="Accuracy")
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        text = json.dumps(v, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return "" if v is None else str(v)


def markdown(result: Result, model: str, plots: list[str], objective: str = "speed") -> str:
    a = result.acceptance
    lines = [
        f"# optrun report: {result.decision.value}",
        "",
        f"Model `{model}` on {result.hardware.name} ({result.hardware.device}). "
        f"Score {result.score:.3f}, risk {result.risk_level}. Objective: {objective}.",
        "",
        result.decision_reason,
        "",
        "## Decision matrix",
        "",
        "| | value | GO needs | CONDITIONAL_GO needs |",
        "|---|---|---|---|",
        f"| pass rate | {a.pass_rate:.1%} ({a.passed}/{a.collected}) | >= {a.target:.0%} | >= {a.minimum:.0%} |",
        f"| critical failures | {sum(1 for t in result.tests if t.critical and not t.passed)} | 0 | 0 |",
        "",
        "## Scorecard",
        "",
        "| part | score | weight |",
        "|---|---|---|",
    ]
    for part, value in result.scorecard.parts.items():
        lines.append(f"| {part} | {value:.3f} | {result.scorecard.weights.get(part, 0):.2f} |")
    failed = [t for t in result.tests if not t.passed]
    lines += ["", f"## Failures ({len(failed)})", ""]
    if failed:
        lines += [
            "| test | category | critical | measured | expected | reason |",
            "|---|---|---|---|---|---|",
        ]
        for t in failed:
            exp = t.expected.describe() if t.expected else ""
            lines.append(
                f"| {t.name} | {t.category.value} | {'yes' if t.critical else 'no'} | "
                f"{_fmt(t.measured)} | {exp} | {t.reason} |"
            )
    else:
        lines.append("None.")
    lines += _own_tests(result.tests)
    lines += _baseline(result)
    lines += ["", "## Recommendations (reported, never applied)", ""]
    lines += [f"- {r}" for r in result.recommendations] or ["None."]
    for s in result.suggestions:
        timed = (
            f" (median of {s.repeats}, spread {s.spread:.1%})" if s.repeats and s.spread is not None else ""
        )
        lines += [
            "",
            f"### {s.test}",
            "",
            f"Measured {s.measured:.4g}{s.unit}{timed} against {s.expected.describe()}{s.unit}; a range that "
            f"would contain it{' and every repeat' if timed else ''}: {s.suggested.describe()}{s.unit}."
            + (f" Note: {s.note}." if s.note else ""),
            "To apply it, merge into the manifest:",
            "",
            "```yaml",
            s.manifest.rstrip(),
            "```",
        ]
    if result.speedups:
        lines += [
            "",
            "## Speedups",
            "",
            "| optimization | median | min | max | repeats |",
            "|---|---|---|---|---|",
        ]
        for k, t in result.speedups.items():
            lines.append(f"| {k} | {t.median:.2f}x | {t.min:.2f}x | {t.max:.2f}x | {t.repeats} |")
    s = result.safety
    lines += ["", "## Safety", "", f"Trips: {json.dumps(s.trips)}; recoveries: {s.recoveries}.", ""]
    lines += [
        "## All tests",
        "",
        "| test | category | passed | measured | expected |",
        "|---|---|---|---|---|",
    ]
    for t in result.tests:
        exp = t.expected.describe() if t.expected else ""
        lines.append(
            f"| {t.name} | {t.category.value} | {'yes' if t.passed else 'NO'} | {_fmt(t.measured)} | {exp} |"
        )
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    return "\n".join(lines) + "\n"


def _own_tests(tests: list[TestResult]) -> list[str]:
    """The user's own tests and the built-in tests their policy overrode."""
    mine = [t for t in tests if t.origin == "user" or t.overridden]
    if not mine:
        return []
    lines = [
        "",
        "## Your tests (spec.acceptance.tests)",
        "",
        "| test | kind | critical | passed | measured | expected | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in mine:
        kind = "your own" if t.origin == "user" else "built-in, overridden"
        exp = t.expected.describe() if t.expected else ""
        lines.append(
            f"| {t.name} | {kind} | {'yes' if t.critical else 'no'} | {'yes' if t.passed else 'NO'} | "
            f"{_fmt(t.measured)} | {exp} | {_cell(t.reason)} |"
        )
    return lines


def _baseline(result: Result) -> list[str]:
    b = result.baseline
    if b is None:
        return []
    lines = ["", f"## Baseline: {b.source}", ""]
    if b.error:
        return [*lines, f"Not compared: {b.error}."]
    failed = sum(not c.passed for c in b.comparisons)
    lines += [
        f"{len(b.comparisons)} figures compared, {failed} regressed beyond tolerance "
        "(change relative to the baseline; a worsening is a fall where higher is better).",
        "",
        "| metric | baseline | measured | change | tolerance | better | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in b.comparisons:
        lines.append(
            f"| {c.metric} | {c.baseline:.4g} | {c.measured:.4g} | {c.change:+.1%} | {c.tolerance:.0%} | "
            f"{c.better} | {'yes' if c.passed else 'NO'} |"
        )
    if b.skipped:
        lines += ["", "Not compared: " + "; ".join(f"{k} ({why})" for k, why in b.skipped.items()) + "."]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
