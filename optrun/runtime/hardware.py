"""Hardware detection: what device a run has, and what it can do.

Recorded in the report (`hardware`) and used to pick defaults: the device class keys the
default speedup ranges, dtype support gates the precision, and `triton_native` says whether
Triton kernels can run compiled (a CUDA device) rather than only in the interpreter.
"""

from __future__ import annotations

import os

import torch

from optrun.api.result import HardwareInfo

# Device classes with their own default acceptance ranges (see optrun.runtime.speedup).
_CLASSES = (
    ("H200", "h200"),
    ("H100", "h100"),
    ("A100", "a100"),
    ("L40", "l40s"),
    ("A10", "a10"),
    ("L4", "l4"),
)


def device_class(name: str, device_type: str) -> str:
    if device_type != "cuda":
        return "cpu"
    for marker, cls in _CLASSES:
        if marker in name.upper():
            return cls
    return "gpu"


def _dtype_ok(dtype: torch.dtype, device: torch.device) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
        return True
    except (RuntimeError, TypeError):
        return False


def detect(prefer: str | None = None) -> tuple[torch.device, HardwareInfo]:
    """The device to run on (CUDA when present, unless OPTRUN_DEVICE or `prefer` says cpu)."""
    choice = prefer or os.environ.get("OPTRUN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, int(props.total_memory)
        capability = f"{props.major}.{props.minor}"
    else:
        name = _cpu_name()
        memory = _host_memory()
        capability = None
    dtypes = {
        "fp32": True,
        "bf16": _dtype_ok(torch.bfloat16, device),
        "fp16": _dtype_ok(torch.float16, device),
        "fp8e4m3": hasattr(torch, "float8_e4m3fn"),
    }
    info = HardwareInfo(
        device=str(device),
        name=name,
        memory_bytes=memory,
        capability=capability,
        device_class=device_class(name, device.type),
        dtypes=dtypes,
        triton_native=device.type == "cuda" and _triton_importable(),
        cpu_count=os.cpu_count() or 1,
        torch_version=torch.__version__,
    )
    return device, info


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
