"""The report: `report.json` (the result contract), `report.md` (decision matrix, scorecard,
failures measured against expected, recommendations) and PNG plots (loss and accuracy with the
safety-gate events marked). The compact form of the result, for a pod's termination message,
is `Result.compact()`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from optrun.api.result import Result
from optrun.runtime.context import RunContext

log = logging.getLogger(__name__)


def write(out: Path, result: Result, ctx: RunContext) -> dict[str, str]:
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "training.png"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    train = ctx.results.get("train", {})
    plotted = plot_training(
        paths["plot"], train.get("losses", []), train.get("evals", []), result.safety.events
    )
    paths["markdown"].write_text(
        markdown(result, ctx.spec.workload.model_name, plots=["training.png"] if plotted else [])
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


def markdown(result: Result, model: str, plots: list[str]) -> str:
    a = result.acceptance
    lines = [
        f"# optrun report: {result.decision.value}",
        "",
        f"Model `{model}` on {result.hardware.name} ({result.hardware.device}). "
        f"Score {result.score:.3f}, risk {result.risk_level}.",
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
    lines += ["", "## Recommendations (reported, never applied)", ""]
    lines += [f"- {r}" for r in result.recommendations] or ["None."]
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
