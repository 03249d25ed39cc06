"""Where each part of a pipeline lives, stage by stage: the one place that moves parts between
the host and the accelerator, so a 9B sweep fits the card the README promises.

  encode     the text encoder and the VAE (only while something needs encoding), then freed
  train      the transformer (its LoRA and optimizer state with it) and the VAE's decoder
  sample     the same: the evaluation's sampling
  distilled  the distilled transformer instead of the base one (the base waits on the host)
  metrics    the above plus one metric network at a time, back on the host after

Loading happens on the host (quantisation too, before anything moves), so the text encoder and
the transformer are never on the accelerator together: a 9B's 8B text encoder (16 GB in bf16)
and its transformer (17 GB) would not fit a 24 GB card side by side.

On the CPU there is nothing to move; the ledger still names the stages. `PlacementSpy` (tests)
records what would be on an accelerator at each stage without moving anything.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    stage: str
    peak_bytes: int = 0  # measured (the CUDA allocator's peak) or summed from the parts' tensors (the spy)
    part_sets: list[tuple[str, ...]] = field(default_factory=list)  # what was on the accelerator, each moment


@dataclass
class Placement:
    device: str
    stages: list[StageRecord] = field(default_factory=list)  # in the order they ran
    _on_device: dict[str, object] = field(default_factory=dict)
    _open: list[StageRecord] = field(default_factory=list)  # the stack of stages entered
    _peak_since_flush: int = 0

    @property
    def accelerated(self) -> bool:
        return self.device not in ("cpu",)

    def to_device(self, name: str, module) -> None:
        """Put a part on the accelerator (nothing moves on the CPU)."""
        if module is None:
            return
        if self.accelerated:
            self._move(module, self.device)
        self._on_device[name] = module
        self._observe()

    def to_host(self, name: str, module=None) -> None:
        """Take a part off the accelerator, and free what it held."""
        module = module if module is not None else self._on_device.get(name)
        self._on_device.pop(name, None)
        if module is not None and self.accelerated:
            self._move(module, "cpu")
            release_cached_memory()
        self._observe()

    def on_device(self) -> tuple[str, ...]:
        return tuple(sorted(self._on_device))

    @contextlib.contextmanager
    def stage(self, name: str):
        """Record the peak of what is on the accelerator while the block runs (an inner stage's
        peak counts for the inner stage only)."""
        self._flush()
        record = StageRecord(name)
        self.stages.append(record)
        self._open.append(record)
        self._observe()
        try:
            yield
        finally:
            self._flush()
            self._open.pop()

    @contextlib.contextmanager
    def visiting(self, name: str, module):
        """A part on the accelerator for the block only (a metric network, the distilled
        transformer), back on the host after."""
        self.to_device(name, module)
        try:
            yield
        finally:
            self.to_host(name, module)

    def peak_by_stage(self) -> dict[str, int]:
        """The highest peak of each stage name, in bytes."""
        out: dict[str, int] = {}
        for r in self.stages:
            out[r.stage] = max(out.get(r.stage, 0), r.peak_bytes)
        return out

    # --- measurement: the CUDA allocator's peak; the spy sums tensors instead ------------------

    def _observe(self) -> None:
        self._peak_since_flush = max(self._peak_since_flush, self._bytes_now())
        if self._open and (parts := self.on_device()) not in self._open[-1].part_sets:
            self._open[-1].part_sets.append(parts)

    def _flush(self) -> None:
        """Close the running stage's stretch: its peak so far into its record, the counter reset."""
        peak = self._measured_peak()
        if self._open:
            self._open[-1].peak_bytes = max(self._open[-1].peak_bytes, peak)
        self._peak_since_flush = self._bytes_now()
        if self.device == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _measured_peak(self) -> int:
        if self.device == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        return self._peak_since_flush

    def _bytes_now(self) -> int:
        if self.device == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.memory_allocated())
        return 0

    def _move(self, module, device: str) -> None:
        module.to(device)


class PlacementSpy(Placement):
    """An accelerator in bookkeeping only: records which parts would be on it at each stage and
    their bytes (parameters and buffers of the modules as they are), moves nothing. Tests run
    the real staging on the CPU with it and price the parts at a 9B's or 4B's sizes."""

    @property
    def accelerated(self) -> bool:
        return True

    def _move(self, module, device: str) -> None:
        pass  # bookkeeping only

    def _bytes_now(self) -> int:
        return sum(module_bytes(m) for m in self._on_device.values())


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors count by shape and dtype)."""
    if not isinstance(module, torch.nn.Module):
        return 0
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def release_cached_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def placement_for(device: str) -> Placement:
    """The placement of a worker's pipeline on `device` (tests replace this with a spy)."""
    return Placement(device)
