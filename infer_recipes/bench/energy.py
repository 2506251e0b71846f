"""Energy counters where the machine has them: Linux RAPL (`/sys/class/powercap/intel-rapl:*`, the CPU packages
and their DRAM) or NVML on NVIDIA GPUs. Elsewhere `available` is False and `why` says what is missing."""
from __future__ import annotations

from pathlib import Path

import torch

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter:
    """read() -> joules since an arbitrary origin (differences are what count); None when unavailable."""

    def __init__(self, device: torch.device, powercap: Path = POWERCAP):
        self.device, self.available, self.why, self.source = device, False, "", ""
        self._zones: list[tuple[Path, int]] = []
        self._last: dict[Path, int] = {}
        self._wraps: dict[Path, int] = {}
        self._nvml = None
        if device.type == "cuda":
            self._init_nvml()
        else:
            self._init_rapl(Path(powercap))

    def _init_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.why = "NVML needs `pip install nvidia-ml-py` (not installed)"
            return
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as e:  # NVML raises its own error types, one per cause
            self.why = f"NVML energy counter unavailable: {e}"
            return
        self._nvml = (pynvml, handle)
        self.available, self.source = True, "NVML total energy consumption (the GPU board)"

    def _init_rapl(self, root: Path) -> None:
        if not root.is_dir():
            self.why = f"no RAPL counters: {root} is absent (a VM or a non-Intel/AMD CPU)"
            return
        # top-level zones only (intel-rapl:0, intel-rapl:1: one per package; their dram subzones are inside)
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        readable = []
        for z in zones:
            try:
                int((z / "energy_uj").read_text())
                readable.append((z, int((z / "max_energy_range_uj").read_text())))
            except (OSError, ValueError):
                continue
        if not readable:
            self.why = (f"no readable RAPL counters under {root} (energy_uj is root-only on many kernels)"
                        if zones else f"no RAPL zones under {root}")
            return
        self._zones = readable
        self.available = True
        self.source = "RAPL " + ", ".join(z.name for z, _ in readable) + " (whole CPU packages: other processes count)"

    def read(self) -> float | None:
        if not self.available:
            return None
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # millijoules
        total = 0
        for zone, span in self._zones:
            uj = int((zone / "energy_uj").read_text())
            if uj < self._last.get(zone, 0):  # the counter wrapped round
                self._wraps[zone] = self._wraps.get(zone, 0) + 1
            self._last[zone] = uj
            total += uj + self._wraps.get(zone, 0) * span
        return total / 1e6
