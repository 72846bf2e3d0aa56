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
    lines += _stages(result.details)
    lines += _kernels(result.details)
    lines += _artifact(result)
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


def _stages(details: dict[str, Any]) -> list[str]:
    """Each stage: ran, skipped (and why) or failed (and how)."""
    stages = details.get("stages")
    if not isinstance(stages, dict) or not stages:
        return []
    lines = ["", "## Stages", "", "| stage | status | seconds | reason |", "|---|---|---|---|"]
    seconds = details.get("stageSeconds") or {}
    for name, entry in stages.items():
        took = seconds.get(name)
        lines.append(
            f"| {name} | {entry.get('status', '')} | {'' if took is None else f'{took:.1f}'} | "
            f"{_cell(str(entry.get('reason', '')))} |"
        )
    return lines


# The kernel table's columns: each candidate the selection measures, as the report names it.
KERNEL_CANDIDATES = {
    "eager": "eager",
    "compile": "torch.compile",
    "triton": "optrun (Triton)",
    "liger": "Liger",
}


def _kernels(details: dict[str, Any]) -> list[str]:
    """Per operation the candidates measured (median forward + backward on the run's shapes), the
    ones not measured or rejected and why, and the choice; then the patched model's parity."""
    k = details.get("kernels")
    if not isinstance(k, dict) or not isinstance(k.get("choices"), dict):
        return []
    lines = [
        "",
        "## Kernels",
        "",
        f"Mode {k.get('mode', '?')} on {k.get('device', '?')}: per operation, the median time of forward + "
        "backward on the inputs the model gives that layer; the fastest candidate that matches eager is chosen.",
        "",
        "| operation | " + " | ".join(KERNEL_CANDIDATES.values()) + " | choice |",
        "|---|" + "---|" * (len(KERNEL_CANDIDATES) + 1),
    ]
    why: dict[tuple[str, str], list[str]] = {}  # (candidate, reason) -> operations
    for op, c in k["choices"].items():
        times, skipped = c.get("times") or {}, c.get("skipped") or {}
        cells = []
        for name in KERNEL_CANDIDATES:
            if name in times:
                cells.append(f"{times[name] * 1e3:.3f} ms")
                continue
            reason = skipped.get(name, skipped.get("*"))
            cells.append("rejected" if reason and reason.startswith("parity") else "not measured")
            if reason:
                why.setdefault((KERNEL_CANDIDATES[name], reason), []).append(op)
        lines.append(f"| {op} | " + " | ".join(cells) + f" | **{c.get('choice', '?')}** |")
    if why:
        lines += [""] + [
            f"- {cand} ({', '.join(ops)}): {_cell(reason)}" for (cand, reason), ops in why.items()
        ]
    parity = k.get("parity")
    if isinstance(parity, dict):
        verdict = "matches" if parity.get("passed") else "DOES NOT match"
        lines += [
            "",
            f"Parity: the patched model {verdict} the unpatched one on held-out data (logits, loss, "
            f"{parity.get('gradients', 0)} gradients; worst relative difference "
            f"{_fmt(parity.get('worstRelativeDifference'))}){': ' + parity['reason'] if parity.get('reason') else ''}.",
        ]
    return lines


def _artifact(result: Result) -> list[str]:
    """Where the judged model is, how big, its held-out loss, and how to load it."""
    a = result.artifact
    lines = ["", "## Artifact", ""]
    if a is None:
        stage = (result.details.get("stages") or {}).get("artifact") or {}
        return [*lines, f"None written{': ' + _cell(str(stage['reason'])) if stage.get('reason') else ''}."]
    lines += [
        f"`{a.path}` ({a.format}): {a.size_bytes:,} bytes ({a.size_bytes / 2**20:.2f} MiB) of weights, config "
        "and tokenizer that a standard loader reads.",
        "",
        f"- Held-out loss: {_fmt(a.held_out_loss)} as written"
        + (
            f", {_fmt(a.reloaded_held_out_loss)} reloaded the standard way"
            if a.reloaded_held_out_loss is not None
            else ""
        )
        + ".",
    ]
    if a.quantization:
        size = (
            f" ({a.quantized_bytes:,} bytes, {a.quantized_bytes / 2**20:.2f} MiB)"
            if a.quantized_bytes
            else ""
        )
        lines.append(
            f"- Quantized form: {a.quantization}{size}; model.safetensors holds the same layers dequantized "
            "(exactly what they compute)."
        )
    else:
        lines.append("- Quantized form: none (float weights).")
    lines += [f"- Applied: {'; '.join(a.optimizations)}." if a.optimizations else "- Applied: nothing."]
    lines += ["", "Load it:", "", "```python"]
    if a.format == "hf-safetensors":
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{a.path}")  # float weights',
            f'tokenizer = AutoTokenizer.from_pretrained("{a.path}")',
        ]
    lines += [
        "from optrun.runtime.artifact import load",
        f'model = load("{a.path}")  # optrun CausalLM'
        + (", with the quantized layers" if a.quantization else ""),
        "```",
    ]
    return lines


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
