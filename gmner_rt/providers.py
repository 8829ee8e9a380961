"""Which onnxruntime execution provider runs a bundle: the user's choice, named and checked.

A provider is asked for by name: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (the
``provider`` argument of :func:`gmner_rt.load`, the ``--provider`` flag of every command that
runs a bundle, or the ``GMNER_PROVIDER`` environment variable). ``auto`` is CUDA where the
installed onnxruntime offers it, else the CPU; TensorRT only when asked for, or when the bundle
carries engines built for this device (the caller says so). Asking for a provider that this
onnxruntime does not offer is an error that names what is installed and what to install.

This module knows nothing about graphs, shapes or TensorRT profiles (:mod:`gmner_rt.tensorrt`
derives those); it turns a name into an onnxruntime provider name and checks it.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
from collections.abc import Iterable, Mapping

from .errors import BackendError

log = logging.getLogger(__name__)

__all__ = ["ENV_PROVIDER", "ORT_NAMES", "PROVIDERS", "choose", "installed_builds"]
__all__ += ["onnxruntime", "provider_name", "requested"]

#: Names a user may ask for.
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
#: The environment variable read when no provider is passed.
ENV_PROVIDER = "GMNER_PROVIDER"
#: Our names -> onnxruntime's execution provider names.
ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: Distributions that install the ``onnxruntime`` package (they overwrite one another).
BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
BUILDS += ("onnxruntime-qnn", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")

INSTALL_HINT = (
    "install one build of onnxruntime: pip install onnxruntime (CPU), pip install "
    "onnxruntime-gpu (CUDA and TensorRT providers, x86_64; gmner's extras [cpu] and [gpu] "
    "install the same), or on a Jetson board the onnxruntime-gpu wheel of its JetPack (gmner's "
    "Jetson page: runtime/jetson/README.md in its sources, gmner/runtime/jetson/README.md "
    "where it is installed)"
)
#: Names people try for a provider -> the one they mean.
_ALIASES = {"gpu": "cuda", "trt": "tensorrt", "nvidia": "cuda", "onnx": "cpu"}


def onnxruntime():
    """The ``onnxruntime`` module, or a :class:`BackendError` that says what to install."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise BackendError(f"onnxruntime is not installed; {INSTALL_HINT}") from None
    return ort


def installed_builds() -> list[str]:
    """The onnxruntime distributions installed here, as "name version"."""
    found = []
    for name in BUILDS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def requested(provider: str | None, *, source: str = "provider") -> str:
    """The provider name asked for: ``provider``, else ``$GMNER_PROVIDER``, else "auto";
    an unknown name is an error naming ``source`` (the argument, flag or variable)."""
    if provider is None:
        env = os.environ.get(ENV_PROVIDER, "").strip()
        provider, source = (env, ENV_PROVIDER) if env else ("auto", source)
    name = provider_name(provider.strip()).lower()
    if name not in PROVIDERS:
        near = (
            [_ALIASES[name]]
            if name in _ALIASES
            else difflib.get_close_matches(name, PROVIDERS, n=1)
        )
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise BackendError(
            f"{source}: unknown provider {provider!r}{hint}; expected one of {', '.join(PROVIDERS)}"
        )
    return name


def choose(name: str, available: Iterable[str], *, engines_here: bool = False) -> str:
    """The provider that runs: ``name`` (from :func:`requested`) checked against the
    onnxruntime providers ``available``; "auto" resolved as the module docstring says."""
    offered = list(available)
    if name == "auto":
        if engines_here and ORT_NAMES["tensorrt"] in offered:
            return "tensorrt"
        return "cuda" if ORT_NAMES["cuda"] in offered else "cpu"
    if ORT_NAMES[name] not in offered:
        raise BackendError(unavailable_message(name, offered))
    return name


def unavailable_message(name: str, offered: list[str]) -> str:
    """Why ``name`` cannot run here: what onnxruntime offers, what is installed, what to do."""
    builds = installed_builds()
    message = (
        f"provider {name!r}: the installed onnxruntime has no {ORT_NAMES[name]} (it offers "
        f"{', '.join(offered) or 'nothing'}; installed: {', '.join(builds) or 'no onnxruntime'})"
    )
    gpu_builds = [b for b in builds if b.startswith(("onnxruntime-gpu", "ort-nightly-gpu"))]
    if gpu_builds and len(builds) > 1:
        names = " ".join(b.split()[0] for b in builds)
        return (
            f"{message}. Several onnxruntime builds are installed and share one package folder, "
            f"so the last one installed won: pip uninstall -y {names}, then pip install "
            f"{gpu_builds[0].split()[0]}"
        )
    if gpu_builds:
        return (
            f"{message}. {gpu_builds[0]} is installed but did not register the provider: check "
            "that the CUDA, cuDNN (and, for TensorRT, TensorRT) libraries it was built for are "
            "installed and on the library path"
        )
    if builds:
        what = "The CUDA provider" if name == "cuda" else "The TensorRT provider (with TensorRT)"
        return (
            f"{message}. {what} comes with onnxruntime-gpu, which replaces this build: pip "
            f"uninstall -y {builds[0].split()[0]}, then pip install onnxruntime-gpu (x86_64), or "
            "on a Jetson board its JetPack's onnxruntime-gpu wheel (gmner's Jetson page)"
        )
    return f"{message}; {INSTALL_HINT}"


def provider_name(ort_name: str) -> str:
    """Our name for an onnxruntime provider name ("cuda" for CUDAExecutionProvider)."""
    for ours, theirs in ORT_NAMES.items():
        if theirs == ort_name:
            return ours
    return ort_name


def legacy_providers(providers: Iterable[str], available: Iterable[str]) -> str:
    """The provider name for a legacy ``providers=[...]`` list, as onnxruntime read it: the
    first one available, but the skipped ones are logged (onnxruntime skips them silently),
    and a list with none available is an error."""
    names = list(providers)
    offered = list(available)
    if not names:
        raise BackendError("providers: an empty list; pass provider='cpu'|'cuda'|'tensorrt'")
    known = ", ".join(ORT_NAMES.values())
    for name in names:
        if provider_name(name) not in ORT_NAMES:
            raise BackendError(f"providers: unknown execution provider {name!r} (known: {known})")
    usable = [n for n in names if n in offered]
    if not usable:
        return choose(provider_name(names[0]), offered)  # the error that says what to install
    skipped = names[: names.index(usable[0])]
    if skipped:
        log.warning(
            "providers: %s not available here (%s); running on %s",
            ", ".join(skipped),
            unavailable_message(provider_name(skipped[0]), offered),
            usable[0],
        )
    return provider_name(usable[0])


def string_options(options: Mapping[str, object] | None, *, source: str) -> dict[str, str]:
    """Provider options as onnxruntime takes them (strings; booleans as "True"/"False")."""
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        if not isinstance(key, str) or not key:
            raise BackendError(f"{source}: option names must be non-empty strings, got {key!r}")
        if isinstance(value, (dict, list, tuple, set)) or value is None:
            raise BackendError(f"{source}: option {key!r} needs a plain value, got {value!r}")
        out[key] = str(value)
    return out
