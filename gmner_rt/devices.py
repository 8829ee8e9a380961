"""Facts about the GPU and the TensorRT library of this machine, read without torch.

TensorRT engines are valid only on the GPU architecture (compute capability) and the TensorRT
version that built them, so the runtime compares these facts with those an engine set was built
with before it uses it. They are read through the CUDA driver API (``libcuda``, present wherever
an NVIDIA driver is, Jetson boards included) and TensorRT's ``getInferLibVersion`` with ctypes:
no torch, no pycuda, no ``tensorrt`` Python module.

This module knows nothing about bundles, engines or onnxruntime; every function returns None
(with the reason logged at debug level) where the library or the device is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger(__name__)

__all__ = ["CudaDevice", "cuda_device", "tensorrt_version"]

_LIBCUDA = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
#: TensorRT 10 and 8 runtime libraries (Linux, Jetson, Windows).
_LIBNVINFER = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer_10.dll")
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device.

    Attributes:
        index: its CUDA ordinal (the ``device_id`` of onnxruntime's providers).
        name: the driver's name for it ("NVIDIA H100 80GB HBM3", "Orin").
        compute_capability: "major.minor" ("9.0", "8.7").
    """

    index: int
    name: str
    compute_capability: str

    @property
    def sm(self) -> str:
        """The architecture as in kernel names and engine names: "sm90", "sm87"."""
        return "sm" + self.compute_capability.replace(".", "")


def _load(names: tuple[str, ...]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            log.debug("%s: %s", name, exc)
    return None


@lru_cache(maxsize=8)
def cuda_device(index: int = 0) -> CudaDevice | None:
    """The CUDA device ``index``, or None without a driver or without such a device."""
    lib = _load(_LIBCUDA)
    if lib is None:
        return None
    device, count = ctypes.c_int(), ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        log.debug("libcuda: cuInit / cuDeviceGetCount failed (no usable GPU)")
        return None
    if not 0 <= index < count.value:
        log.debug("libcuda: no device %d (%d found)", index, count.value)
        return None
    if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (
        lib.cuDeviceGetName(name, len(name), device) != 0
        or lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) != 0
        or lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) != 0
    ):
        return None
    return CudaDevice(index, name.value.decode(errors="replace"), f"{major.value}.{minor.value}")


@lru_cache(maxsize=1)
def tensorrt_version() -> str | None:
    """The TensorRT runtime's version ("10.3.0"), or None where no libnvinfer loads."""
    lib = _load(_LIBNVINFER)
    if lib is None:
        return None
    try:
        number = int(lib.getInferLibVersion())
    except AttributeError:
        return None
    return version_from_int(number)


def version_from_int(number: int) -> str:
    """TensorRT's ``NV_TENSORRT_VERSION`` integer as "major.minor.patch": 100300 -> 10.3.0
    (TensorRT >= 10: major * 10000 + minor * 100 + patch), 8601 -> 8.6.1 (TensorRT 8: major *
    1000 + minor * 100 + patch)."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"
