"""From a run's workload to the model it judges.

`model_factory(spec, device)` returns a function that gives, at every call, a fresh copy of the
model as the user gave it: the built-in model initialised from the run's seed, the Hugging Face
model read from its directory again, or the result of the user's `package.module:factory`.
The run loads it once for its lineage (baseline, kernels, training, ...); scratch runs of the
acceptance suite and the speedup matrix take fresh copies.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from optrun.api.v1alpha1 import ModelSource, OptimizationRunSpec
from optrun.runtime.lm.base import CausalLM
from optrun.runtime.lm.sources import (
    FACTORY_ALLOWED,
    MODEL_FIELD,
    SourceProblem,
    available_memory,
    import_factory,
    parameter_count,
)

log = logging.getLogger(__name__)

# A training step holds the weights about four times over (weights, gradients and AdamW's two
# moments), before activations.
TRAINING_COPIES = 4


class ModelLoadError(ValueError):
    """A model that cannot be loaded; `problems` are field-named lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def model_factory(spec: OptimizationRunSpec, device: torch.device) -> Callable[[], CausalLM]:
    source = spec.workload.model
    seed = spec.training.seed

    def build() -> CausalLM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(source, ModelSource):
                check_fits(source, spec.workload.precision, device)
                from optrun.runtime.lm import hf

                return hf.load(source, precision=spec.workload.precision, device=device)
            if ":" in source:
                return _from_factory(source).to(device)
            from optrun.runtime.model import build_model

            return build_model(source).to(device)

    return build


def _from_factory(name: str) -> CausalLM:
    """Call the user's factory and wrap what it returns. Its errors are the user's to fix: they
    come back as one line naming the field and where the factory raised, not as a traceback of
    optrun (the full traceback goes to the debug log)."""
    from optrun.runtime.lm import hf

    try:
        fn = import_factory(name)
    except SourceProblem as exc:
        raise ModelLoadError([str(exc)]) from exc
    try:
        made = fn()
    except Exception as exc:  # the user's code: whatever it raises is a bad model source
        log.debug("the factory %s raised:\n%s", name, traceback.format_exc())
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise ModelLoadError(
            [
                f"{MODEL_FIELD}: the factory {name!r} raised {type(exc).__name__}: {exc} "
                f"(at {Path(frame.filename).name}:{frame.lineno}); {FACTORY_ALLOWED}"
            ]
        ) from exc
    try:
        return hf.wrap(made, MODEL_FIELD)
    except hf.SourceError as exc:
        raise ModelLoadError(exc.problems) from exc


def check_fits(source: ModelSource, precision: str, device: torch.device) -> None:
    """Refuse, naming the bytes, a model whose weights alone exceed the memory free on `device`."""
    from optrun.runtime.lm.hf import weights_dtype

    # Loading converts the stored weights to the run's weights dtype.
    per_param = torch.empty((), dtype=weights_dtype(precision)).element_size()
    params = parameter_count(Path(source.path))
    need = params * per_param
    free = available_memory(device)
    if free is not None and need > free:
        raise ModelLoadError(
            [
                f"{MODEL_FIELD}.path: the weights of {source.path} need {need} bytes "
                f"({params} parameters in {str(weights_dtype(precision)).removeprefix('torch.')}) and {device} "
                f"has {free} bytes free; training needs about {TRAINING_COPIES}x that plus activations"
            ]
        )
