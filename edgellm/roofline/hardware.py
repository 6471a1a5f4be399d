"""Hardware for the roofline: peak operations per second per precision, memory bandwidth, capacity.

Three sources, one type (:class:`Hardware`):

* the built-in table :data:`HARDWARE` (datasheet figures, each entry naming its source);
* a YAML or JSON file with the same fields (:func:`load_hardware_file`), e.g.::

      name: My accelerator
      peak_TOPS: {fp32: 35.6, fp16: 71, int8: 284}   # dense, no sparsity
      memory_bandwidth_GBps: 936
      memory_GB: 24
      source: "vendor datasheet, rev 3"                # optional

* ``local``: this machine, measured by :mod:`edgellm.roofline.measure` and cached as a file in
  the format above under ``$XDG_CACHE_HOME/edgellm/`` (default ``~/.cache/edgellm/``).

For the planner (:mod:`edgellm.roofline.planner`) an entry may also carry its power and its
chip-to-chip link, each with its own source (optional in a file)::

      power_W: 300            # busy power: TDP / board power, or a measured figure
      idle_power_W: 25        # optional: what it draws doing nothing
      power_source: "vendor datasheet"
      link_GBps: 56.25        # one direction of one chip-to-chip link, gigabytes per second
      link_latency_us: 2      # one hop, microseconds
      link_source: "NVLink bridge spec; latency an estimate"

A figure nobody publishes is left out (None) rather than guessed; the planner then says what it
assumed or asks for a flag (``--link-gbps``, ``--link-latency-us``) or a hardware file.

Peak figures are *dense* (vendors often quote 2:4 sparse throughput; those are halved here).
An operation is one multiply or one add, so a multiply-add counts as two.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.util import cache_dir

T = 1e12
G = 1e9

# Precisions a peak may be given for, and which of them serve an operation of a given bit width,
# in order of preference.
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
_PRECISIONS_FOR_BITS = {
    32: ("fp32",),
    16: ("fp16", "bf16"),
    8: ("int8", "fp8"),
    4: ("int4",),
}
COMPUTE_BITS = (4, 8, 16, 32)


class UnknownHardwareError(EdgeLLMError):
    """A hardware name that is neither in the table, nor a file, nor ``local``."""


class HardwareFormatError(EdgeLLMError):
    """A hardware file with a missing or wrong field."""


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_ops: Mapping[str, float]          # precision -> dense ops/s
    bandwidth: float                       # bytes/s of main memory (HBM, DRAM, or on-die SRAM for Groq)
    memory_bytes: float                    # capacity of that memory
    source: str
    kind: str = ""
    notes: str = ""
    measured: dict = field(default_factory=dict, compare=False)   # filled for `local`
    # Energy and links, for the planner; None where no trustworthy figure exists.
    power_W: float | None = None           # busy power (TDP / max board or module power, or measured)
    idle_power_W: float | None = None      # power doing nothing; None = unknown (energy is then a lower bound)
    power_source: str = ""
    link_bandwidth: float | None = None    # bytes/s, one direction of one chip-to-chip link
    link_latency_s: float | None = None    # seconds, one hop
    link_source: str = ""

    def compute_precision(self, bits: int) -> tuple[str, float]:
        """The precision (and its peak ops/s) that runs an operation on ``bits``-bit operands.

        A precision the chip lacks runs at the next wider precision it has (operands widened);
        if it has none wider, at the widest it has.
        """
        if bits not in COMPUTE_BITS:
            raise InvalidParameterError(f"compute precision must be one of {COMPUTE_BITS} bits, got {bits}")
        wider = [b for b in COMPUTE_BITS if b >= bits] + sorted((b for b in COMPUTE_BITS if b < bits), reverse=True)
        for b in wider:
            for prec in _PRECISIONS_FOR_BITS[b]:
                if self.peak_ops.get(prec):
                    return prec, float(self.peak_ops[prec])
        raise HardwareFormatError(f"hardware '{self.name}' lists no peak throughput")

    def peak(self, bits: int) -> float:
        return self.compute_precision(bits)[1]

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "peak_TOPS": {k: v / T for k, v in self.peak_ops.items()},
            "memory_bandwidth_GBps": self.bandwidth / G,
            "memory_GB": self.memory_bytes / G,
            "source": self.source,
        }
        if self.kind:
            d["kind"] = self.kind
        if self.notes:
            d["notes"] = self.notes
        if self.measured:
            d["measured"] = self.measured
        if self.power_W is not None:
            d["power_W"] = self.power_W
        if self.idle_power_W is not None:
            d["idle_power_W"] = self.idle_power_W
        if self.power_source:
            d["power_source"] = self.power_source
        if self.link_bandwidth is not None:
            d["link_GBps"] = self.link_bandwidth / G
        if self.link_latency_s is not None:
            d["link_latency_us"] = self.link_latency_s * 1e6
        if self.link_source:
            d["link_source"] = self.link_source
        return d


def _hw(name: str, kind: str, peaks_tops: dict, bw_gbps: float, mem_gb: float, source: str,
        notes: str = "", power: tuple | None = None, link: tuple | None = None) -> Hardware:
    """``power`` = (busy W, idle W or None, source); ``link`` = (GB/s one direction, latency us, source)."""
    busy_w, idle_w, power_source = power if power else (None, None, "")
    link_gbps, link_us, link_source = link if link else (None, None, "")
    return Hardware(name=name, kind=kind, peak_ops={k: v * T for k, v in peaks_tops.items()},
                    bandwidth=bw_gbps * G, memory_bytes=mem_gb * G, source=source, notes=notes,
                    power_W=busy_w, idle_power_W=idle_w, power_source=power_source,
                    link_bandwidth=None if link_gbps is None else link_gbps * G,
                    link_latency_s=None if link_us is None else link_us * 1e-6, link_source=link_source)


# Link latencies are not in any datasheet: the figures below are order-of-magnitude estimates of one
# hop's start-up cost (a collective library's small-message time), marked as such in each source.
_NVLINK_LATENCY_US = 2.0
_PCIE_LATENCY_US = 5.0
_ETHERNET_LATENCY_US = 30.0
_PCIE4_X16_GBPS = 31.5          # 16 GT/s x 16 lanes x 128/130 encoding / 8 bits, one direction


# key -> entry. Dense figures; "(sparse / 2)" marks figures derived from a sparse datasheet number.
# power / link: see _hw. The Apple, Qualcomm and Rockchip parts have none: their makers publish no
# power figure for the GPU/NPU that runs the model (only whole-device figures or none), and they have
# no chip-to-chip link; give them in a hardware file (power_W, link_GBps) to plan with them.
HARDWARE: dict[str, Hardware] = {
    "A100-40GB": _hw(
        "NVIDIA A100 40GB SXM", "datacenter GPU",
        {"fp32": 19.5, "tf32": 156, "fp16": 312, "bf16": 312, "int8": 624, "int4": 1248}, 1555, 40,
        "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf); INT4 from the NVIDIA A100 architecture whitepaper",
        power=(400, None, "A100 datasheet: max TDP 400 W (SXM4)"),
        link=(300, _NVLINK_LATENCY_US, "A100 datasheet: NVLink 600 GB/s (both directions together, so 300 each "
              "way); latency an estimate")),
    "A100-80GB": _hw(
        "NVIDIA A100 80GB SXM", "datacenter GPU",
        {"fp32": 19.5, "tf32": 156, "fp16": 312, "bf16": 312, "int8": 624, "int4": 1248}, 2039, 80,
        "NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM column",
        power=(400, None, "A100 datasheet: max TDP 400 W (SXM4)"),
        link=(300, _NVLINK_LATENCY_US, "A100 datasheet: NVLink 600 GB/s both directions (300 each way); latency "
              "an estimate")),
    "H100-SXM": _hw(
        "NVIDIA H100 SXM 80GB", "datacenter GPU",
        {"fp32": 67, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9}, 3350, 80,
        "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/), SXM column, "
        "tensor-core figures sparse / 2",
        power=(700, None, "H100 datasheet: max TDP up to 700 W (SXM, configurable)"),
        link=(450, _NVLINK_LATENCY_US, "H100 datasheet: NVLink 900 GB/s both directions (450 each way); latency "
              "an estimate")),
    "H200": _hw(
        "NVIDIA H200 SXM 141GB", "datacenter GPU",
        {"fp32": 67, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9}, 4800, 141,
        "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/), SXM column, "
        "tensor-core figures sparse / 2",
        power=(700, None, "H200 datasheet: max TDP up to 700 W (SXM, configurable)"),
        link=(450, _NVLINK_LATENCY_US, "H200 datasheet: NVLink 900 GB/s both directions (450 each way); latency "
              "an estimate")),
    "A6000": _hw(
        "NVIDIA RTX A6000 48GB", "workstation GPU",
        {"fp32": 38.7, "tf32": 77.4, "fp16": 154.8, "bf16": 154.8, "int8": 309.7, "int4": 619.4}, 768, 48,
        "NVIDIA RTX A6000 datasheet (nvidia.com/content/dam/en-zz/Solutions/design-visualization/quadro-product-"
        "literature/proviz-print-nvidia-rtx-a6000-datasheet-us-nvidia-1454980-r9-web.pdf): 309.7 TFLOPS tensor "
        "with sparsity; dense tensor figures from the NVIDIA Ampere GA102 GPU architecture whitepaper",
        power=(300, None, "RTX A6000 datasheet: max power consumption 300 W"),
        link=(56.25, _NVLINK_LATENCY_US, "RTX A6000 datasheet: NVLink bridge (2 cards) 112.5 GB/s both directions "
              "(56.25 each way); latency an estimate")),
    "RTX-3090": _hw(
        "NVIDIA GeForce RTX 3090 24GB", "consumer GPU",
        {"fp32": 35.6, "fp16": 71, "bf16": 71, "int8": 284, "int4": 568}, 936, 24,
        "NVIDIA Ampere GA102 GPU architecture whitepaper v2, table 9 (GeForce RTX 3090); FP16 tensor with FP32 "
        "accumulate (142 TFLOPS with FP16 accumulate)",
        power=(350, None, "NVIDIA GeForce RTX 3090 specifications: total graphics power 350 W"),
        link=(56.25, _NVLINK_LATENCY_US, "Ampere GA102 whitepaper: NVLink (2 cards) 112.5 GB/s both directions "
              "(56.25 each way); latency an estimate")),
    "RTX-4090": _hw(
        "NVIDIA GeForce RTX 4090 24GB", "consumer GPU",
        {"fp32": 82.6, "fp16": 165.2, "bf16": 165.2, "fp8": 330.3, "int8": 660.6, "int4": 1321.2}, 1008, 24,
        "NVIDIA Ada GPU architecture whitepaper v2.02, appendix A (GeForce RTX 4090); FP16/FP8 tensor with FP32 "
        "accumulate (twice that with FP16 accumulate)",
        power=(450, None, "NVIDIA GeForce RTX 4090 specifications: total graphics power 450 W"),
        link=(_PCIE4_X16_GBPS, _PCIE_LATENCY_US, "no NVLink on the 4090: PCIe 4.0 x16 through the host, 31.5 GB/s "
              "each way (PCIe 4.0 specification); latency an estimate")),
    "Jetson-AGX-Orin": _hw(
        "NVIDIA Jetson AGX Orin 64GB (GPU)", "edge module",
        {"fp32": 5.3, "fp16": 42.5, "int8": 85}, 204.8, 64,
        "NVIDIA Jetson AGX Orin Series technical brief v1.2: GPU 170 sparse INT8 TOPS (85 dense), FP16 tensor "
        "half of INT8, 5.3 FP32 TFLOPS; 204.8 GB/s LPDDR5",
        notes="GPU only; the two DLAs (105 sparse INT8 TOPS) are left out",
        power=(60, None, "NVIDIA Jetson AGX Orin Series data sheet: 64GB module power 15-60 W by "
               "power mode; 60 W (MAXN) taken as busy power. Idle power is not published (it depends on the "
               "carrier board and the mode), so it is left unknown"),
        link=(1.25, _ETHERNET_LATENCY_US, "Jetson AGX Orin Developer Kit specification: 10GbE (10 Gb/s = 1.25 "
              "GB/s each way); modules have no chip-to-chip fabric; latency an estimate for a switched LAN hop")),
    "Apple-M2-Max": _hw(
        "Apple M2 Max (38-core GPU)", "laptop SoC",
        {"fp32": 13.6, "fp16": 13.6, "int8": 15.8}, 400, 96,
        "Apple Newsroom 'Apple unveils M2 Pro and M2 Max' (Jan 2023): 400 GB/s unified memory up to 96 GB, "
        "16-core Neural Engine 15.8 TOPS; GPU FP32 = 38 cores x 128 ALUs x 2 x 1.398 GHz (Wikipedia 'Apple M2')",
        notes="fp32/fp16 on the GPU, int8 on the Neural Engine"),
    "Apple-M3-Max": _hw(
        "Apple M3 Max (40-core GPU)", "laptop SoC",
        {"fp32": 14.2, "fp16": 14.2, "int8": 18}, 400, 128,
        "Apple Newsroom 'Apple unveils M3, M3 Pro, and M3 Max' (Oct 2023): 400 GB/s, up to 128 GB, Neural "
        "Engine 18 TOPS; GPU FP32 is an estimate (40 cores x 128 ALUs x 2 x ~1.4 GHz), Apple publishes none",
        notes="fp32/fp16 on the GPU, int8 on the Neural Engine"),
    "Snapdragon-8-Gen-3": _hw(
        "Qualcomm Snapdragon 8 Gen 3", "phone SoC",
        {"fp32": 4.6, "fp16": 9.2, "int8": 34}, 76.8, 16,
        "Qualcomm Snapdragon 8 Gen 3 product brief: LPDDR5X at 4.8 GHz, 64-bit (76.8 GB/s); Qualcomm publishes "
        "no TOPS: Hexagon NPU INT8 and Adreno 750 FP32/FP16 are third-party estimates",
        notes="int8 on the Hexagon NPU, fp32/fp16 on the Adreno GPU; 16 GB is a typical flagship phone"),
    "RK3588": _hw(
        "Rockchip RK3588 NPU", "edge SoC",
        {"fp32": 0.2, "fp16": 1.5, "int8": 6}, 34, 16,
        "Rockchip RK3588 datasheet / product brief: NPU 6 TOPS (INT8; INT4/INT8/INT16/FP16 supported), "
        "LPDDR4X-4224 64-bit (33.8 GB/s); FP16 NPU rate (1/4 of INT8) and FP32 on the 4xA76+4xA55 CPU are estimates",
        notes="int8/fp16 on the NPU, fp32 on the CPU cores"),
    "Groq-LPU": _hw(
        "Groq LPU (GroqChip 1)", "dataflow accelerator",
        {"fp16": 188, "int8": 750}, 80000, 0.23,
        "Groq GroqChip 1 product brief; Abts et al., 'Think Fast: A Tensor Streaming Processor', ISCA 2020: "
        "750 INT8 TOPS, 188 FP16 TFLOPS, 230 MB on-die SRAM at 80 TB/s",
        notes="no DRAM: the 'memory' is 230 MB of SRAM per chip, so models span hundreds of chips",
        power=(300, None, "TechSpot, 'Groq launches first AI accelerator card' (2020): the TSP draws "
               "~300 W; GroqCard figures are quoted between ~215 W typical and 375 W maximum, so this is "
               "uncertain; idle power not published"),
        link=(14, 1.0, "Linley Group, 'Groq Gets Connected' (Nov 2020): 16 chip-to-chip links per chip, each four "
              "30 Gb/s lanes (28 Gb/s cabled): 14 GB/s per link each way, 480 GB/s in all; the planner uses one "
              "link per neighbour. Hop latency (~1 us) is an estimate")),
    "Grayskull-e150": _hw(
        "Tenstorrent Grayskull e150", "dataflow accelerator",
        {"fp16": 83, "fp8": 332}, 118.4, 8,
        "Tenstorrent Grayskull e150 specifications (tenstorrent.com/hardware/grayskull): 332 TFLOPS FP8 "
        "(block FP8), 83 TFLOPS FP16, 8 GB LPDDR4 at 118.4 GB/s, 120 MB SRAM",
        power=(200, None, "Tenstorrent Grayskull e150 specifications: board power (TBP) 200 W"),
        link=(_PCIE4_X16_GBPS, _PCIE_LATENCY_US, "no chip-to-chip links on the e150: PCIe 4.0 x16 through the host, "
              "31.5 GB/s each way; latency an estimate")),
}

_ALIASES = {
    "a100": "A100-80GB", "a100-80g": "A100-80GB", "a100-40g": "A100-40GB", "h100": "H100-SXM",
    "h200-sxm": "H200", "rtx-a6000": "A6000", "3090": "RTX-3090", "4090": "RTX-4090",
    "orin": "Jetson-AGX-Orin", "jetson-orin": "Jetson-AGX-Orin", "m2-max": "Apple-M2-Max",
    "m3-max": "Apple-M3-Max", "snapdragon": "Snapdragon-8-Gen-3", "rk3588-npu": "RK3588", "groq": "Groq-LPU",
    "grayskull": "Grayskull-e150",
}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def hardware_names() -> list[str]:
    return list(HARDWARE) + ["local"]


def lookup_builtin(name: str) -> Hardware | None:
    key = _norm(name)
    for k, hw in HARDWARE.items():
        if _norm(k) == key:
            return hw
    if key in _ALIASES:
        return HARDWARE[_ALIASES[key]]
    return None


def resolve_hardware(spec: str | None, remeasure: bool = False, log=None) -> Hardware:
    """A table name, a YAML/JSON file path, or ``local`` (measured and cached)."""
    valid = ", ".join(hardware_names())
    if not spec:
        raise UnknownHardwareError("no hardware given", f"pass --hardware with one of: {valid}; or a YAML/JSON file")
    if spec.strip().lower() == "local":
        return local_hardware(remeasure=remeasure, log=log)
    hw = lookup_builtin(spec)
    if hw is not None:
        return hw
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        return load_hardware_file(path)
    raise UnknownHardwareError(f"unknown hardware '{spec}'",
                               f"use one of: {valid}; or the path of a YAML/JSON hardware file")


# ---- files --------------------------------------------------------------------------------------
_REQUIRED_FIELDS = ("name", "peak_TOPS", "memory_bandwidth_GBps", "memory_GB")


def _positive_number(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HardwareFormatError(f"hardware file {path}: field '{where}' must be a positive number, got {value!r}",
                                  "give it in the units its name says (TOPS, GB/s, GB)")
    return float(value)


def hardware_from_dict(data: Any, path: Path | str = "<dict>") -> Hardware:
    path = Path(path)
    example = ("e.g. name: X, peak_TOPS: {fp16: 71, int8: 284}, memory_bandwidth_GBps: 936, memory_GB: 24, "
               "source: datasheet")
    if not isinstance(data, Mapping):
        raise HardwareFormatError(f"hardware file {path}: expected a mapping of fields at the top level", example)
    missing = [f for f in _REQUIRED_FIELDS if f not in data]
    if missing:
        raise HardwareFormatError(f"hardware file {path}: missing field {', '.join(repr(m) for m in missing)}",
                                  example)
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise HardwareFormatError(f"hardware file {path}: field 'name' must be a non-empty string", example)
    peaks = data["peak_TOPS"]
    if not isinstance(peaks, Mapping) or not peaks:
        raise HardwareFormatError(f"hardware file {path}: field 'peak_TOPS' must map precisions to TOPS",
                                  f"precisions: {', '.join(PRECISIONS)}")
    peak_ops = {}
    for prec, value in peaks.items():
        if prec not in PRECISIONS:
            raise HardwareFormatError(f"hardware file {path}: unknown precision 'peak_TOPS.{prec}'",
                                      f"precisions: {', '.join(PRECISIONS)}")
        peak_ops[prec] = _positive_number(value, f"peak_TOPS.{prec}", path) * T
    bw = _positive_number(data["memory_bandwidth_GBps"], "memory_bandwidth_GBps", path) * G
    mem = _positive_number(data["memory_GB"], "memory_GB", path) * G
    source = data.get("source", f"file {path}")
    if not isinstance(source, str):
        raise HardwareFormatError(f"hardware file {path}: field 'source' must be a string", example)
    measured = data.get("measured") or {}

    def optional(key: str, scale: float) -> float | None:
        # power and link figures are optional: a file without them still analyses, the planner asks
        return None if data.get(key) is None else _positive_number(data[key], key, path) * scale

    return Hardware(name=data["name"], peak_ops=peak_ops, bandwidth=bw, memory_bytes=mem, source=source,
                    kind=str(data.get("kind", "")), notes=str(data.get("notes", "")),
                    measured=dict(measured) if isinstance(measured, Mapping) else {},
                    power_W=optional("power_W", 1.0), idle_power_W=optional("idle_power_W", 1.0),
                    power_source=str(data.get("power_source", "")),
                    link_bandwidth=optional("link_GBps", G), link_latency_s=optional("link_latency_us", 1e-6),
                    link_source=str(data.get("link_source", "")))


def load_hardware_file(path: Path | str) -> Hardware:
    path = Path(path)
    if not path.is_file():
        raise UnknownHardwareError(f"hardware file {path} does not exist",
                                   f"use one of: {', '.join(hardware_names())}; or an existing YAML/JSON file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError, yaml.YAMLError
        raise HardwareFormatError(f"hardware file {path} is not valid {path.suffix.lstrip('.').upper() or 'YAML'}: "
                                  f"{err}".replace("\n", " "), "fix the syntax") from None
    return hardware_from_dict(data, path)


# ---- this machine ---------------------------------------------------------------------------------


def local_cache_path() -> Path:
    return cache_dir() / "hardware-local.json"


def local_hardware(remeasure: bool = False, log=None, budget_s: float = 3.0) -> Hardware:
    """This machine: from the cache if it was measured with the same threads and torch, else measured now."""
    from edgellm.roofline import measure

    path = local_cache_path()
    fingerprint = measure.machine_fingerprint()
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("measured", {}).get("fingerprint") == fingerprint:
                return hardware_from_dict(data, path)
        except (ValueError, EdgeLLMError):
            pass  # a damaged or stale cache is measured again
    if log:
        n = fingerprint["threads"]
        log(f"measuring this machine ({n} thread{'' if n == 1 else 's'}, a few seconds); cached in {path}")
    data = measure.measure_local(budget_s=budget_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        if log:
            log(f"could not cache the measurement in {path}: {err}")
    return hardware_from_dict(data, path)
