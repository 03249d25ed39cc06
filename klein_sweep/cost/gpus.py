"""Peak dense bf16 rates (TFLOP/s, no sparsity) of the GPUs people train Klein LoRAs on: the one
place the cost preview and the benchmarks read them from."""

from __future__ import annotations

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "RTX 5090": 209.5}


def peak_tflops(gpu: str) -> float:
    from klein_sweep.errors import ConfigError

    if gpu not in PEAK_TFLOPS:
        raise ConfigError("sweep.cost_gpu", gpu, f"one of {', '.join(PEAK_TFLOPS)}")
    return PEAK_TFLOPS[gpu]
