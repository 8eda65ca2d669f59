"""The machine's own matmul peak, the denominator of every MFU figure.

A large square matmul is as close to the hardware's best as PyTorch gets: measured here in
bf16 and fp32 (and fp16 where the stages compute in it) with the threads PyTorch would use for
training. MFU divides by the peak of the precision the stages compute in (`precision=auto`):
a CPU without AMX or AVX512-BF16 trains in fp32, and its bf16 matmul, emulated, can be 40×
slower than its fp32 one, so a bf16 denominator there would report MFUs far above 100%.
"""

from __future__ import annotations

import platform
import time


def matmul_gflops(dtype, size: int, seconds: float = 2.0) -> float:
    """Best-of-several GFLOP/s of a `size`×`size` matmul in `dtype`, after a warm-up."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def machine(quick: bool = False) -> dict:
    import torch

    from rlhf.models import resolve_precision

    size = 1024 if quick else 4096
    precision = resolve_precision("auto")
    info = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "matmul_size": size,
        "precision": precision,
        "peak_gflops": {"bf16": matmul_gflops(torch.bfloat16, size, 1.0 if quick else 3.0),
                        "fp32": matmul_gflops(torch.float32, size, 1.0 if quick else 3.0)},
    }
    if precision == "fp16":
        info["peak_gflops"]["fp16"] = matmul_gflops(torch.float16, size, 1.0 if quick else 3.0)
    try:
        flags = open("/proc/cpuinfo").read()
        info["cpu_bf16"] = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                                  if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def mfu_peak_gflops(info: dict) -> float:
    """The denominator of MFU: the matmul peak in the precision the stages compute in on this machine."""
    return info["peak_gflops"][info["precision"]]
