"""The report: report.json reads back as the result contract, report.md shows the decision
matrix, the failures measured against expected and the recommendations, the training plot is
a PNG, and the compact form for a termination message stays within 4 KiB whatever the run
produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optrun import judge
from optrun.api.result import (
    ArtifactInfo,
    Category,
    Expected,
    Result,
    SafetySummary,
    TestResult,
    Timing,
    TrainingSummary,
)
from optrun.runtime import report
from optrun.runtime.context import RunContext
from optrun.runtime.hardware import detect
from tests.unit.runtime.runtime_support import pydoc_corpus, seeded_model, small_spec


def sample_tests() -> list[TestResult]:
    return [
        TestResult(
            name="infra.hardware-detected",
            category=Category.CRITICAL_INFRASTRUCTURE,
            critical=True,
            passed=True,
            measured="cpu: test",
            reason="ok",
        ),
        TestResult(
            name="speedup.kernels",
            category=Category.TUNING,
            passed=False,
            measured=2.57,
            expected=Expected(min=2.0, max=2.5),
            reason="measured 2.57x against 2.0..2.5x",
            spread=0.01,
            repeats=5,
            unit="x",
        ),
        TestResult(
            name="tuning.convergence-smoothness",
            category=Category.TUNING,
            passed=False,
            measured=0.09,
            expected=Expected(max=0.05),
            reason="held-out loss rose 9%",
        ),
        TestResult(
            name="e2e.training-completed",
            category=Category.END_TO_END,
            critical=True,
            passed=True,
            measured=3,
            expected=Expected(min=3),
            reason="3/3 epochs",
        ),
    ]


def sample_result() -> Result:
    spec = small_spec()
    _, hardware = detect("cpu")
    return judge.build_result(
        sample_tests(),
        spec.acceptance,
        safety=SafetySummary(
            trips={"nan_loss": 1},
            recoveries=1,
            events=[{"gate": "nan_loss", "step": 5, "action": "rollback", "rolled_back_to": 4}],
        ),
        speedups={"kernels": Timing(median=2.57, min=2.5, max=2.6, repeats=5)},
        training=TrainingSummary(epochs=3, steps=300, final_loss=1.9, final_accuracy=0.41),
        hardware=hardware,
        details={"stageSeconds": {"train": 12.5}},
        exit_reason="completed",
    )


def context(tmp_path: Path, train: dict[str, object]) -> RunContext:
    spec = small_spec()
    device, hardware = detect("cpu")
    ctx = RunContext(
        spec=spec,
        device=device,
        hardware=hardware,
        corpus=pydoc_corpus(),
        model_factory=lambda: seeded_model(spec),
        output_dir=tmp_path,
    )
    ctx.results["train"] = train
    return ctx


TRAIN = {
    "losses": [(s, 5.0 - s * 0.01) for s in range(0, 300) if s != 5],
    "evals": [
        {"epoch": e, "step": 100 * (e + 1), "loss": 3.0 - e * 0.5, "accuracy": 0.2 + e * 0.1}
        for e in range(3)
    ],
}


def test_report_json_reads_back_as_the_result_contract(tmp_path: Path) -> None:
    result = sample_result()
    paths = report.write(tmp_path, result, context(tmp_path, TRAIN))
    doc = json.loads(Path(paths["json"]).read_text())
    assert Result.model_validate(doc) == result
    # The contract's camelCase names (docs/architecture.md) are what is on disk.
    assert {
        "decision",
        "score",
        "riskLevel",
        "acceptance",
        "tests",
        "safety",
        "speedups",
        "training",
        "hardware",
        "recommendations",
    } <= doc.keys()
    assert {"collected", "passed", "failed", "passRate", "target", "minimum"} <= doc["acceptance"].keys()
    assert {"finalLoss", "finalAccuracy", "epochs"} <= doc["training"].keys()
    assert {"device", "name", "memoryBytes"} <= doc["hardware"].keys()


def test_report_markdown_has_decision_matrix_failures_and_recommendations(tmp_path: Path) -> None:
    result = sample_result()
    paths = report.write(tmp_path, result, context(tmp_path, TRAIN))
    md = Path(paths["markdown"]).read_text()
    assert md.startswith(f"# optrun report: {result.decision.value}")
    assert "## Decision matrix" in md
    assert "| pass rate | 50.0% (2/4) | >= 95% | >= 85% |" in md
    assert "| critical failures | 0 | 0 | 0 |" in md
    assert "## Failures (2)" in md
    failures = md.split("## Failures (2)", 1)[1].split("##", 1)[0]
    assert "| speedup.kernels | tuning | no | 2.57 | 2..2.5 |" in failures
    assert "| tuning.convergence-smoothness | tuning | no | 0.09 | <= 0.05 |" in failures
    assert "infra.hardware-detected" not in failures
    recommendations = md.split("## Recommendations", 1)[1].split("##", 1)[0]
    assert result.recommendations, "an out-of-range measurement must give a recommendation"
    for line in result.recommendations:
        assert f"- {line}" in recommendations
    assert "widen max to 2.6x" in recommendations
    assert "## Scorecard" in md
    assert '"nan_loss": 1' in md
    assert "![training.png](training.png)" in md


def section(md: str, title: str) -> str:
    """The text of report.md's section `title`, up to the next section."""
    assert f"\n## {title}\n" in md, f"no section {title!r}"
    return md.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_markdown_names_the_artifact_its_size_held_out_loss_and_how_to_load_it() -> None:
    artifact = ArtifactInfo(
        path="/runs/mine/model",
        format="hf-safetensors",
        size_bytes=3 * 2**20 + 5,
        quantized_bytes=2**20,
        held_out_loss=2.71828,
        reloaded_held_out_loss=2.71829,
        quantization="int8 weight-only codes and scales of 14 linear layers in quantized.safetensors",
        optimizations=["kernels: rms_norm=eager", "compression: int8 weight-only"],
    )
    md = report.markdown(sample_result().model_copy(update={"artifact": artifact}), "m", [])
    text = section(md, "Artifact")
    assert "`/runs/mine/model` (hf-safetensors): 3,145,733 bytes (3.00 MiB)" in text
    assert "- Held-out loss: 2.718 as written, 2.718 reloaded the standard way." in text
    assert (
        "- Quantized form: int8 weight-only codes and scales of 14 linear layers in quantized.safetensors "
        "(1,048,576 bytes, 1.00 MiB)" in text
    )
    assert "- Applied: kernels: rms_norm=eager; compression: int8 weight-only." in text
    assert 'model = AutoModelForCausalLM.from_pretrained("/runs/mine/model")' in text
    assert 'model = load("/runs/mine/model")  # optrun CausalLM, with the quantized layers' in text


def test_report_markdown_says_why_no_artifact_was_written() -> None:
    details = {"stages": {"artifact": {"status": "failed", "reason": "OSError: disk full"}}}
    md = report.markdown(sample_result().model_copy(update={"details": details}), "m", [])
    assert section(md, "Artifact").strip() == "None written: OSError: disk full."
    assert "| artifact | failed |  | OSError: disk full |" in section(md, "Stages")


def test_report_markdown_has_a_kernel_table_of_every_candidate_per_operation() -> None:
    kernels = {
        "mode": "auto",
        "device": "NVIDIA H100",
        "choices": {
            "rms_norm": {
                "choice": "triton",
                "times": {"eager": 1e-3, "triton": 4e-4, "liger": 5e-4, "compile": 8e-4},
                "skipped": {},
            },
            "swiglu": {
                "choice": "eager",
                "times": {"eager": 2e-3},
                "skipped": {
                    "triton": "parity: output 0: 3 of 64 elements beyond tolerance",
                    "liger": "liger-kernel is not installed (pip install liger-kernel)",
                    "compile": "did not finish compiling within 2s",
                },
            },
        },
        "parity": {"passed": True, "worstRelativeDifference": 1.5e-6, "gradients": 19, "reason": ""},
    }
    md = report.markdown(sample_result().model_copy(update={"details": {"kernels": kernels}}), "m", [])
    text = section(md, "Kernels")
    assert "| operation | eager | torch.compile | optrun (Triton) | Liger | choice |" in text
    assert "| rms_norm | 1.000 ms | 0.800 ms | 0.400 ms | 0.500 ms | **triton** |" in text
    assert "| swiglu | 2.000 ms | not measured | rejected | not measured | **eager** |" in text
    assert "- optrun (Triton) (swiglu): parity: output 0: 3 of 64 elements beyond tolerance" in text
    assert "- Liger (swiglu): liger-kernel is not installed (pip install liger-kernel)" in text
    assert (
        "Parity: the patched model matches the unpatched one on held-out data (logits, loss, 19 gradients"
        in text
    )


def test_training_plot_is_a_png(tmp_path: Path) -> None:
    paths = report.write(tmp_path, sample_result(), context(tmp_path, TRAIN))
    png = Path(paths["plot"])
    assert png.name == "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 400 and height > 200


def test_run_without_training_history_has_no_plot(tmp_path: Path) -> None:
    paths = report.write(tmp_path, sample_result(), context(tmp_path, {}))
    assert "plot" not in paths
    assert not (tmp_path / "training.png").exists()
    assert "training.png" not in Path(paths["markdown"]).read_text()


# -- the compact form ------------------------------------------------------------------------------

measured_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(min_size=0, max_size=2000),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=300),
    st.dictionaries(st.text(max_size=30), st.integers(), max_size=60),
)


@st.composite
def big_results(draw: st.DrawFn) -> Result:
    n = draw(st.integers(min_value=0, max_value=500))
    reason = draw(st.text(min_size=0, max_size=3000))
    measured = draw(measured_values)
    tests = [
        TestResult(
            name=f"speedup.case-{i}-" + "x" * draw(st.integers(0, 80)),
            category=Category.TUNING,
            critical=i % 7 == 0,
            passed=False,
            measured=measured,
            expected=Expected(min=1.0, max=2.0),
            reason=reason,
        )
        for i in range(n)
    ]
    return judge.build_result(
        tests,
        small_spec().acceptance,
        safety=SafetySummary(
            trips={f"gate{i}": i for i in range(20)},
            recoveries=7,
            events=[{"gate": "nan_loss", "step": i} for i in range(200)],
        ),
        speedups={k: Timing(median=1.5, min=1.0, max=2.0, repeats=5) for k in ("kernels", "all", "kvcache")},
        details={"blob": "y" * draw(st.integers(0, 20_000))},
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(big_results())
def test_compact_result_fits_a_termination_message(result: Result) -> None:
    text = result.compact()
    assert len(text.encode()) <= 4096
    back = Result.model_validate(json.loads(text))
    # The operator re-derives the decision from what survives, whatever was dropped.
    assert back.decision == result.decision
    assert back.acceptance == result.acceptance
    assert judge.decide(back.acceptance) == result.decision
    assert all(not t.passed for t in back.tests)


def test_compact_result_with_500_failures_keeps_the_counts(tmp_path: Path) -> None:
    tests = [
        TestResult(
            name=f"t{i}",
            category=Category.TUNING,
            passed=False,
            measured=list(range(500)),
            expected=Expected(max=1.0),
            reason="r" * 5000,
        )
        for i in range(500)
    ]
    result = judge.build_result(tests, small_spec().acceptance)
    text = result.compact()
    assert len(text.encode()) <= 4096
    back = json.loads(text)
    assert back["acceptance"]["collected"] == 500
    assert back["acceptance"]["failed"] == 500
    assert back["decision"] == "NO_GO"


def test_compact_result_of_a_small_run_keeps_its_failures() -> None:
    result = sample_result()
    back = json.loads(result.compact())
    assert [t["name"] for t in back["tests"]] == ["speedup.kernels", "tuning.convergence-smoothness"]
    assert back["recommendations"] == result.recommendations
    assert "details" not in back
    assert "events" not in back["safety"]


@pytest.mark.parametrize("decision_from", ["GO", "NO_GO"])
def test_report_title_names_the_decision(tmp_path: Path, decision_from: str) -> None:
    tests = (
        sample_tests()[:1]
        if decision_from == "GO"
        else [t.model_copy(update={"passed": False}) for t in sample_tests()]
    )
    result = judge.build_result(tests, small_spec().acceptance)
    assert result.decision.value == decision_from
    md = report.markdown(result, "tiny-lm", plots=[])
    assert md.splitlines()[0] == f"# optrun report: {decision_from}"
