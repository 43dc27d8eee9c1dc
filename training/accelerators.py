"""What each accelerator chip offers: peak FLOP/s, memory, memory and interconnect bandwidth.

Vendors' data sheets, per chip; `hbm_bytes` is what XLA lets one program use where its
compiler reports it (a TPU compile that runs out of memory prints it), else the data sheet's.
"""

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  device_kind: str  # the prefix of jax.Device.device_kind
  peak_flops: float  # dense bfloat16 FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # chip-to-chip links together (ICI, NVLink), one direction
  host_bytes_per_s: float  # to and from host memory (offloaded activations)


CHIPS = {
  "v4": Chip("TPU v4", "TPU v4", 275e12, 32 * GiB, 1228e9, 300e9, 16e9),
  "v5e": Chip("TPU v5e", "TPU v5 lite", 197e12, 15.75 * GiB, 819e9, 200e9, 16e9),
  "v5p": Chip("TPU v5p", "TPU v5", 459e12, 95.74 * GiB, 2765e9, 600e9, 16e9),
  "v6e": Chip("TPU v6e", "TPU v6 lite", 918e12, 31.25 * GiB, 1640e9, 448e9, 16e9),
  "a100": Chip("NVIDIA A100 80GB", "NVIDIA A100", 312e12, 80e9, 2039e9, 300e9, 25e9),
  "h100": Chip("NVIDIA H100 SXM", "NVIDIA H100", 989e12, 80e9, 3350e9, 450e9, 50e9),
  "h200": Chip("NVIDIA H200 SXM", "NVIDIA H200", 989e12, 141e9, 4800e9, 450e9, 50e9),
}


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The chip whose device_kind prefix matches (the longest match: "TPU v5 lite" before "TPU v5")."""
  matches = [chip for chip in CHIPS.values() if device_kind.startswith(chip.device_kind)]
  return max(matches, key=lambda chip: len(chip.device_kind)) if matches else None
