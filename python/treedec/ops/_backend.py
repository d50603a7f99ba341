"""Which implementation an op runs: the TREEDEC_BACKEND switch and what is available."""

import os

import torch

BACKENDS = ("auto", "reference", "cpp", "cuda", "triton")


def requested_backend() -> str:
    name = os.environ.get("TREEDEC_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"TREEDEC_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def available_backends() -> dict[str, bool]:
    """Native backends arrive with the native-kernels work; until then only the reference exists."""
    return {"reference": True, "cpp": False, "cuda": False, "triton": False}


def choose_backend(device: torch.device) -> str:
    """The backend an op on tensors of `device` runs, honouring TREEDEC_BACKEND."""
    name = requested_backend()
    if name == "auto":
        return "reference"
    if not available_backends()[name]:
        raise RuntimeError(
            f"TREEDEC_BACKEND={name} was requested but that backend is not built in this install "
            "(`treedec info` lists what is available); unset it or use TREEDEC_BACKEND=reference"
        )
    return name
