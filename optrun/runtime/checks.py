"""The core acceptance tests: critical infrastructure, safety gates, end-to-end and stability,
and the tuning checks that need no optimization (smoothness, reproducibility, gradient flow,
batch efficiency).

The safety tests prove the gates on a scratch copy: a fresh model and a throw-away checkpoint
directory, with a fault injected, so the real run is never touched.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families

from optrun.api.result import Category, Expected
from optrun.api.v1alpha1 import Fault, OptimizationRunSpec
from optrun.runtime.acceptance import SUITE, Check, in_range
from optrun.runtime.context import RunContext
from optrun.runtime.kernels.parity import MODEL_TOLERANCE, tolerance
from optrun.runtime.lm.base import adamw, autocast, evaluate, fingerprint
from optrun.runtime.metrics import Metrics
from optrun.runtime.training.checkpoint import CheckpointStore
from optrun.runtime.training.gates import SafetyGateFailed, group_grad_norms
from optrun.runtime.training.loop import Trainer

CI = Category.CRITICAL_INFRASTRUCTURE
# Held-out loss of the artifact reloaded against the model in memory: the same weights through
# the same code, so only the float ordering of a reloaded copy may differ.
ARTIFACT_RTOL = 1e-4


def scratch_spec(
    spec: OptimizationRunSpec, *, steps: int, faults: list[Fault] | None = None, policy: str | None = None
) -> OptimizationRunSpec:
    """A small copy of the run's spec for scratch training: a few short steps, optional faults."""
    w = spec.workload.model_copy(
        update={
            "batch_size": min(spec.workload.batch_size, 4),
            "sequence_length": min(spec.workload.sequence_length, 32),
        }
    )
    t = spec.training.model_copy(
        update={
            "epochs": 1,
            "steps_per_epoch": steps,
            "warmup_steps": 1,
            "eval_batches": 1,
            "checkpoint": spec.training.checkpoint.model_copy(update={"every_steps": 2, "keep": 2}),
        }
    )
    s = spec.safety if policy is None else spec.safety.model_copy(update={"non_finite_loss": policy})
    return spec.model_copy(update={"workload": w, "training": t, "faults": faults or [], "safety": s})


@contextlib.contextmanager
def _expected_trips() -> Iterator[None]:
    """Scratch runs trip their gates on purpose: their warnings are not the run's own, so they
    are held back (errors still show)."""
    loggers = [
        logging.getLogger(n) for n in ("optrun.runtime.training.loop", "optrun.runtime.training.faults")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def scratch_train(
    ctx: RunContext, spec: OptimizationRunSpec, model: torch.nn.Module | None = None
) -> tuple[Trainer, str | None]:
    """Train `model` (default: a fresh copy of the model as given) under `spec` in a temporary
    directory; returns the trainer and the failed gate, if one failed."""
    with tempfile.TemporaryDirectory(prefix="optrun-scratch-") as tmp, _expected_trips():
        model = model if model is not None else ctx.model_factory()
        trainer = Trainer(spec, model, ctx.corpus, ctx.device, CheckpointStore(Path(tmp), keep=2), Metrics())
        try:
            trainer.fit()
        except SafetyGateFailed as exc:
            return trainer, exc.gate
    return trainer, None


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- critical infrastructure --------------------------------------------------------------------


# Relative error of a 64x64 fp32 matmul on the device against an exact float64 product: a CPU's
# fp32 BLAS lands near 1e-7, TF32 on a GPU near 1e-3. Detected memory against the system's own
# figure: the same number read two ways, apart only by rounding.
MATMUL_RTOL = {"cpu": 1e-4, "cuda": 1e-2}
MEMORY_RTOL = 0.02


def _system_memory(device: torch.device) -> tuple[int | None, str]:
    """The device's total memory as the system reports it, read another way than detection
    does (the CUDA driver's cudaMemGetInfo; the kernel's /proc/meminfo), and where from."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1]), "cudaMemGetInfo"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo"
    except OSError:
        pass
    return None, "no /proc/meminfo here"


@SUITE.test("infra.hardware-detected", CI, critical=True)
def hardware_detected(ctx: RunContext) -> Check:
    """The detected device is the one the run computes on, its memory is what the system reports
    for it, and it computes: a fp32 matmul on it agrees with the exact product, summed in float64
    without a BLAS (so a CPU's broken or reduced-precision BLAS fails too)."""
    hw = ctx.hardware
    problems = []
    if not hw.name:
        problems.append("the detected device has no name")
    if hw.device.split(":")[0] != ctx.device.type:
        problems.append(f"detected {hw.device} but the run computes on {ctx.device}")
    system, source = _system_memory(ctx.device)
    if system is not None and not abs(hw.memory_bytes - system) <= MEMORY_RTOL * system:
        problems.append(f"detected {hw.memory_bytes} bytes of memory, {source} reports {system}")
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    exact = (a.double()[:, :, None] * a.double()[None, :, :]).sum(dim=1)
    rtol = MATMUL_RTOL.get(ctx.device.type, MATMUL_RTOL["cuda"])
    try:
        got = torch.mm(a.to(ctx.device), a.to(ctx.device)).cpu().double()
        err = float((got - exact).abs().max() / exact.abs().max())
    except RuntimeError as exc:  # a device that cannot compute is what this test is for
        err = math.inf
        problems.append(f"a matmul on {ctx.device} failed: {exc}")
    if not err <= rtol:
        problems.append(f"a 64x64 fp32 matmul on {ctx.device} is {err:.3g} off the exact product (relative)")
    memory = f"{hw.memory_bytes / 2**30:.1f} GiB" + (
        f" ({source} agrees)" if system is not None else f" ({source})"
    )
    return Check(
        not problems,
        measured={"device": hw.device, "name": hw.name, "matmulError": err, "memoryBytes": hw.memory_bytes},
        expected=Expected(max=rtol),
        reason="; ".join(problems)
        or f"{hw.device} ({hw.name}, {hw.device_class}, {memory}) computes: a fp32 matmul {err:.2g} off "
        "the exact product",
    )


@SUITE.test("infra.precision-supported", CI, critical=True)
def precision_supported(ctx: RunContext) -> Check:
    p = ctx.spec.workload.precision
    ok = ctx.hardware.dtypes.get(p, False)
    return Check(
        ok,
        measured=p,
        expected=Expected(equals=[k for k, v in ctx.hardware.dtypes.items() if v]),
        reason=f"{p} {'is' if ok else 'is not'} supported on {ctx.hardware.device}",
    )


@SUITE.test("infra.checkpoint-restores", CI, critical=True)
def checkpoint_restores(ctx: RunContext) -> Check:
    """The newest checkpoint of the real run, loaded into a fresh copy of the model, gives the
    held-out loss the run measured at that step, and training continues from it for a step."""
    store = CheckpointStore(ctx.output_dir / "checkpoints", keep=ctx.spec.training.checkpoint.keep)
    found = store.latest()
    if found is None:
        return Check(False, reason="no checkpoint found")
    path, step = found.path, found.step
    evals = [e for e in found.meta["history"]["evals"] if e["step"] == step]
    if not evals:
        return Check(False, measured=path.name, reason=f"{path.name} holds no evaluation of its step {step}")
    fresh = ctx.model_factory()
    # One more optimizer step from the checkpoint's optimizer state: it must load and move the weights.
    opt = adamw(fresh, ctx.spec.training.learning_rate, ctx.spec.training.weight_decay)
    store.restore(found, fresh, opt)
    loss = evaluate(fresh, ctx.eval_batches(), ctx.device, ctx.dtype)["loss"]
    recorded = evals[-1]["loss"]
    rel = abs(loss - recorded) / max(abs(recorded), 1e-12)
    rtol = tolerance(ctx.dtype, MODEL_TOLERANCE).rtol
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    x, y = ctx.corpus.batch(
        "train", min(ctx.spec.workload.sequence_length, 32), 2, torch.Generator().manual_seed(5)
    )
    fresh.train()
    with autocast(ctx.device, ctx.dtype):
        step_loss = fresh.loss(x.to(ctx.device), y.to(ctx.device))
    step_loss.backward()
    opt.step()
    moved = any(not torch.equal(p, before[n]) for n, p in fresh.named_parameters())
    step_loss = step_loss.detach()
    ok = rel <= rtol and moved and math.isfinite(float(step_loss))
    return Check(
        ok,
        measured={"checkpoint": path.name, "heldOutLoss": round(loss, 8), "recorded": round(recorded, 8)},
        expected=Expected(max=rtol),
        reason=f"{path.name} (step {step}) in a fresh model: held-out loss {loss:.6f} against {recorded:.6f} "
        f"recorded (relative difference {rel:.2e}, allowed {rtol:g}); one more step "
        + ("moved the weights" if moved else "did not move the weights")
        + f" at loss {float(step_loss):.4f}",
    )


# Stages that read the model and must hand on the weights they received (the kernels patch code,
# never values). Training and compression say whether they changed the weights (`_changed`);
# RLVR is in neither: a GRPO step whose groups all scored alike has no advantage to follow.
READ_ONLY_STAGES = ("baseline", "kernels", "kvcache", "artifact")


def _changed(ctx: RunContext, stage: str) -> str | None:
    """What a stage recorded that must have changed the weights it received, or None."""
    if stage == "train":
        steps = len(ctx.results.get("train", {}).get("losses", []))
        return f"{steps} optimizer steps" if steps else None
    if stage == "compression":
        weights = (ctx.results.get("compression") or {}).get("weights") or {}
        layers = weights.get("compressedTensors", 0)
        return f"{layers} quantized layers" if layers else None
    return None


@SUITE.test("infra.lineage-unbroken", CI, critical=True)
def lineage_unbroken(ctx: RunContext) -> Check:
    """The model judged is the one the stages made, measured on the models themselves: its
    fingerprint now is the one the last stage handed on, the float model the training tests
    judge is the one compression received, nothing between two stages changed the model, a stage
    that took optimizer steps or quantized layers handed on other weights than it received, and
    a stage that only reads handed on the same."""
    chain = ctx.results.get("lineage", [])
    if not chain or ctx.model is None:
        return Check(False, reason="no lineage recorded" if not chain else "the run left no model to judge")
    problems = []
    judged = fingerprint(ctx.model)
    if judged != chain[-1]["handedOn"]:
        problems.append(f"the judged model is not the one {chain[-1]['stage']} handed on")
    # Between two stages on the lineage others run (the speedup matrix): they must leave it alone.
    problems += [
        f"{b['stage']} received other weights than {a['stage']} handed on"
        for a, b in itertools.pairwise(chain)
        if b["received"] != a["handedOn"]
    ]
    by_stage = {link["stage"]: link for link in chain}
    trained = by_stage.get("compression", {}).get("received")
    if ctx.trained is not None and trained is not None and fingerprint(ctx.trained) != trained:
        problems.append("the trained float model changed after compression received it")
    for link in chain:
        same = link["received"] == link["handedOn"]
        change = _changed(ctx, link["stage"])
        if change and same:
            problems.append(f"{link['stage']} recorded {change} but handed on the weights it received")
        elif link["stage"] in READ_ONLY_STAGES and not same:
            problems.append(f"{link['stage']} only reads the model but changed its weights")
    stages = " -> ".join(link["stage"] for link in chain)
    return Check(
        not problems,
        measured={"stages": len(chain), "judged": judged},
        reason="; ".join(problems)
        or f"one model through {stages}: the judged model's fingerprint is the last stage's, each stage "
        "changed the weights only where it trained or quantized",
    )


@SUITE.test("infra.artifact-reloads", CI, critical=True)
def artifact_reloads(ctx: RunContext) -> Check:
    """The artifact, loaded back the standard way, has the held-out loss of the model judged."""
    art = ctx.results.get("artifact") or {}
    if "reloadedHeldOutLoss" not in art:
        return Check(False, reason=f"no artifact was written: {art.get('error', 'the stage did not run')}")
    a, b = art["heldOutLoss"], art["reloadedHeldOutLoss"]
    rel = abs(a - b) / max(abs(a), 1e-12)
    rtol = ARTIFACT_RTOL
    return Check(
        rel <= rtol,
        measured=round(rel, 10),
        expected=Expected(max=rtol),
        reason=f"{art['path']} ({art['format']}, {art['sizeBytes']} bytes) reloaded: held-out loss {b:.6f} "
        f"against {a:.6f} in memory (relative difference {rel:.2e})",
    )


# What a run's /metrics must show moved: the family, and what "moved" means for its samples.
MOVED = {
    "optrun_step": "a step above 0",
    "optrun_loss": "a finite loss above 0",
    "optrun_step_duration_seconds": "timed steps",
    "optrun_progress_timestamp_seconds": "a progress time",
}


def _moved(families: dict[str, Any]) -> dict[str, str]:
    """Per family of MOVED that did not move: what it shows instead."""
    stuck = {}
    for name in MOVED:
        samples = {s.name: s.value for s in families[name].samples} if name in families else None
        if samples is None:
            stuck[name] = "not exported"
            continue
        value = samples.get(f"{name}_count", samples.get(name, 0.0))
        ok = math.isfinite(value) and value > 0
        if not ok:
            stuck[name] = f"{value:g}"
    return stuck


@SUITE.test("infra.metrics-exported", CI, critical=True)
def metrics_exported(ctx: RunContext) -> Check:
    """The run's /metrics endpoint, scraped over HTTP, shows the training's figures moved: the
    step, the loss, the timed steps and the progress time (a run that serves no endpoint is
    scraped on a loopback one opened for this test)."""
    metrics: Metrics = ctx.results["metrics"]
    url = ctx.results.get("metrics_url")
    opened = url is None
    if opened:
        url = f"http://127.0.0.1:{metrics.serve(0, '127.0.0.1')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as exc:
        return Check(False, reason=f"scraping {url} failed: {exc}")
    finally:
        if opened:
            metrics.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    stuck = _moved(families)
    step = (
        {s.name: s.value for s in families["optrun_step"].samples}.get("optrun_step")
        if "optrun_step" in families
        else None
    )
    return Check(
        not stuck,
        measured={"families": len(families), "step": step, "stuck": stuck},
        reason=(
            f"scraped {url}: did not move: "
            + ", ".join(f"{n} ({v}; wanted {MOVED[n]})" for n, v in stuck.items())
            if stuck
            else f"scraped {url}: {len(families)} metric families, step {step:g}, loss, step times and "
            "progress moved"
        ),
    )


# -- safety -------------------------------------------------------------------------------------


@SUITE.test("safety.run-gates", Category.SAFETY, critical=True)
def run_gates(ctx: RunContext) -> Check:
    """The real run's gates held: training finished within the recovery budget."""
    train = ctx.results.get("train", {})
    failed = train.get("gate_failed")
    recoveries = train.get("recoveries", 0)
    budget = ctx.spec.safety.max_recoveries
    if failed:
        return Check(
            False,
            measured={"recoveries": recoveries, "trips": train.get("trips", {})},
            expected=Expected(max=budget),
            reason=f"safety gate {failed} failed: {train.get('gate_message')}",
        )
    return Check(
        True,
        measured=recoveries,
        expected=Expected(max=budget),
        reason=f"{recoveries} recoveries, trips {train.get('trips', {})}",
    )


@SUITE.test("safety.no-hang", Category.SAFETY)
def no_hang(ctx: RunContext) -> Check:
    """The watchdog saw progress within hangTimeoutSeconds throughout the run."""
    hangs = ctx.results.get("hangs", [])
    timeout = ctx.spec.safety.hang_timeout_seconds
    return Check(
        not hangs,
        measured=len(hangs),
        expected=Expected(equals=0),
        reason=(
            f"the watchdog reported {len(hangs)} hang(s): no progress for "
            + ", ".join(f"{h['idle_seconds']:g}s" for h in hangs)
            + f" (hangTimeoutSeconds {timeout})"
            if hangs
            else f"no hang reported (no stretch without progress over {timeout}s)"
        ),
    )


def _injected(ctx: RunContext, kind: str, gate: str) -> Check:
    spec = scratch_spec(ctx.spec, steps=6, faults=[Fault(type=kind, at_step=3)], policy="rollback")
    trainer, failed = scratch_train(ctx, spec)
    caught = trainer.book.trips.get(gate, 0)
    ok = (
        caught >= 1
        and trainer.book.recoveries >= 1
        and failed is None
        and _finite(trainer.model)
        and trainer.step == 6
    )
    return Check(
        ok,
        measured={"trips": caught, "recoveries": trainer.book.recoveries, "failed": failed},
        reason=f"injected {kind} at step 3 on a scratch copy: {caught} trip(s) of {gate}, "
        f"{trainer.book.recoveries} recovery, finished {trainer.step}/6 steps"
        + (f"; gate {failed} failed" if failed else ""),
    )


@SUITE.test("safety.nan-loss-caught-and-recovered", Category.SAFETY, critical=True)
def nan_loss_recovered(ctx: RunContext) -> Check:
    return _injected(ctx, "nan-loss", "nan_loss")


@SUITE.test("safety.exploding-gradient-caught-and-recovered", Category.SAFETY, critical=True)
def exploding_recovered(ctx: RunContext) -> Check:
    return _injected(ctx, "exploding-gradient", "gradient_exploding")


@SUITE.test("safety.persistent-fault-fails-the-gate", Category.SAFETY)
def persistent_fault_fails(ctx: RunContext) -> Check:
    """A fault no recovery fixes must end in a failed gate, not an endless loop."""
    spec = scratch_spec(
        ctx.spec, steps=6, faults=[Fault(type="nan-loss", at_step=2, persistent=True)], policy="rollback"
    )
    trainer, failed = scratch_train(ctx, spec)
    return Check(
        failed is not None,
        measured={"failed": failed, "recoveries": trainer.book.recoveries},
        reason=f"persistent nan-loss: gate {failed or 'did not fail'} after {trainer.book.recoveries} "
        "recoveries",
    )


@SUITE.test("safety.vanishing-gradient-caught", Category.SAFETY)
def vanishing_caught(ctx: RunContext) -> Check:
    """A dead final norm (gain 0) cuts the gradient to every layer below it, as a collapsed
    layer does: training a scratch copy from it must trip the vanishing-gradient gate."""
    model = ctx.model_factory()
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower() and hasattr(m, "weight")]
    if not norms:
        return Check(False, reason=f"{type(model).__name__} has no norm layer to kill")
    with torch.no_grad():
        norms[-1].weight.zero_()
    spec = scratch_spec(ctx.spec, steps=2, policy="fail")
    trainer, failed = scratch_train(ctx, spec, model)
    caught = trainer.book.trips.get("gradient_vanishing", 0)
    detail = next(
        (e.get("detail", "") for e in trainer.book.events if e.get("gate") == "gradient_vanishing"), ""
    )
    return Check(
        failed == "gradient_vanishing",
        measured={"trips": caught, "failed": failed},
        reason=f"final norm zeroed on a scratch copy: {caught} trip(s) of gradient_vanishing, gate "
        f"{failed or 'did not fail'}"
        + (f" ({detail})" if detail else "")
        + f" (minNorm {spec.safety.gradient_flow.min_norm:g})",
    )


# -- end to end ---------------------------------------------------------------------------------


@SUITE.test("e2e.training-completed", Category.END_TO_END, critical=True)
def training_completed(ctx: RunContext) -> Check:
    train = ctx.results.get("train", {})
    done, want = train.get("epochs", 0), ctx.spec.training.epochs
    error = f" ({train['error']})" if train.get("error") else ""
    return Check(
        done >= want,
        measured=done,
        expected=Expected(min=want),
        reason=f"trained {done} of {want} epochs{error}",
    )


@SUITE.test("e2e.target-accuracy", Category.END_TO_END, critical=True)
def target_accuracy(ctx: RunContext) -> Check:
    acc = ctx.results.get("train", {}).get("final_accuracy", 0.0)
    return in_range(acc, ctx.spec.training.target_accuracy, None, what="held-out next-token accuracy")


@SUITE.test("e2e.loss-decreased", Category.END_TO_END)
def loss_decreased(ctx: RunContext) -> Check:
    """Training lowered the held-out loss of the model as given (the baseline stage's, on the
    same held-out batches): for a pretrained model, below what it already knew."""
    baseline = ctx.results.get("baseline") or {}
    if "loss" not in baseline:
        why = f": {baseline['error']}" if "error" in baseline else ""
        return Check(
            False, reason=f"no baseline: the held-out loss of the model as given was not measured{why}"
        )
    before = baseline["loss"]
    after = ctx.results.get("train", {}).get("final_loss", math.inf)
    check = in_range(after, None, before, what="held-out loss after training (at most the model as given's)")
    check.measured = {"baseline": round(before, 6), "trained": round(after, 6)}
    return check


# -- stability ------------------------------------------------------------------------------------


@SUITE.test("stability.weights-finite", Category.STABILITY, critical=True)
def weights_finite(ctx: RunContext) -> Check:
    models = [m for m in (ctx.trained, ctx.model) if m is not None]
    ok = bool(models) and all(_finite(m) for m in models)
    return Check(ok, reason="all trained weights are finite" if ok else "non-finite weights after training")


@SUITE.test("stability.no-out-of-memory-backoff", Category.STABILITY)
def no_oom_backoff(ctx: RunContext) -> Check:
    """Training fit in memory at the run's batch: no out-of-memory error halved its micro-batch
    (a run that only fits by accumulating gradients trains, but not as it was asked to)."""
    train = ctx.results.get("train", {})
    backoffs = train.get("oom_backoffs", 0)
    error = str(train.get("error", ""))
    if train.get("gate_failed") == "oom":
        error = str(train.get("gate_message", ""))
    if error.startswith("OutOfMemoryError") or train.get("gate_failed") == "oom":
        return Check(
            False, measured=backoffs, reason=f"training ran out of memory past every back-off: {error}"
        )
    batch = ctx.spec.workload.batch_size
    return Check(
        backoffs == 0,
        measured=backoffs,
        expected=Expected(equals=0),
        reason=f"{backoffs} out-of-memory back-off(s): batch {batch} trained in {2**backoffs} micro-batches"
        if backoffs
        else f"batch {batch} trained in one piece, no out-of-memory back-off",
    )


@SUITE.test("stability.step-time-steady", Category.STABILITY)
def step_time_steady(ctx: RunContext) -> Check:
    """The slow tail of step times stays close to the median: p90 / p50 from 10 timed steps,
    the slowest over the median below that (fewer than 3 steps cannot show a tail)."""
    times = ctx.results.get("train", {}).get("step_seconds", [])
    if len(times) < 3:
        return Check(False, measured=len(times), reason=f"only {len(times)} steps timed: no tail to judge")
    if len(times) >= 10:
        tail, what = statistics.quantiles(times, n=10)[-1], f"p90/p50 step time over {len(times)} steps"
    else:
        tail, what = max(times), f"slowest/median step time over {len(times)} steps"
    return in_range(tail / statistics.median(times), None, 3.0, what=what, unit="x")


# -- tuning ---------------------------------------------------------------------------------------


@SUITE.test("tuning.convergence-smoothness", Category.TUNING)
def convergence_smoothness(ctx: RunContext) -> Check:
    """Largest relative rise of held-out loss between consecutive evaluations."""
    evals = ctx.results.get("train", {}).get("evals", [])
    losses = [e["loss"] for e in evals]
    rises = [(b - a) / a for a, b in itertools.pairwise(losses) if a > 0]
    worst = max([0.0, *rises])
    return in_range(
        worst,
        None,
        ctx.spec.acceptance.convergence_smoothness,
        what=f"largest relative rise of held-out loss over {len(losses)} evaluations",
    )


@SUITE.test("tuning.fixed-seed-reproducibility", Category.TUNING)
def reproducibility(ctx: RunContext) -> Check:
    """Two scratch runs with the same seed end with the same weights, within the dtype's tolerance."""
    spec = scratch_spec(ctx.spec, steps=4)
    runs = []
    for _ in range(2):
        trainer, _failed = scratch_train(ctx, spec)
        runs.append(trainer.model.state_dict())
    tol = ctx.spec.acceptance.reproducibility
    rtol, atol = (tol.rtol, tol.atol) if ctx.dtype == torch.float32 else (1.6e-2, 1e-3)
    worst = max(float((a - runs[1][k]).abs().max()) for k, a in runs[0].items())
    same = all(torch.allclose(a, runs[1][k], rtol=rtol, atol=atol) for k, a in runs[0].items())
    return Check(
        same,
        measured=worst,
        expected=Expected(max=atol),
        reason=f"largest weight difference {worst:.3g} (rtol {rtol:g}, atol {atol:g})",
    )


@SUITE.test("tuning.gradient-flow", Category.TUNING)
def gradient_flow(ctx: RunContext) -> Check:
    """Every layer group of the trained model still gets gradient (none vanished)."""
    trained = ctx.trained or ctx.model
    assert trained is not None
    model = copy.deepcopy(trained)
    x, y = ctx.corpus.batch("val", ctx.spec.workload.sequence_length, 4, torch.Generator().manual_seed(2))
    model.zero_grad()
    model.loss(x.to(ctx.device), y.to(ctx.device)).backward()
    norms = group_grad_norms(model)
    weakest = min(norms, key=lambda g: norms[g])
    bound = ctx.spec.safety.gradient_flow.min_norm
    return in_range(norms[weakest], bound, None, what=f"smallest group gradient norm ({weakest})")


@SUITE.test("tuning.batch-efficiency", Category.TUNING)
def batch_efficiency(ctx: RunContext) -> Check:
    """Tokens per second at the run's batch size against a quarter of it (forward + backward)."""
    model = ctx.model_factory()
    w = ctx.spec.workload
    big, small = w.batch_size, max(1, w.batch_size // 4)
    gen = torch.Generator().manual_seed(3)
    rates = {}
    for b in (small, big):
        x, y = ctx.corpus.batch("train", w.sequence_length, b, gen)
        x, y = x.to(ctx.device), y.to(ctx.device)
        samples = []
        for i in range(4):
            started = time.perf_counter()
            model.loss(x, y).backward()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                samples.append(b * w.sequence_length / (time.perf_counter() - started))
        rates[b] = statistics.median(samples)
    return in_range(
        rates[big] / rates[small],
        0.9,
        None,
        what=f"throughput per token at batch {big} over batch {small}",
        unit="x",
    )
