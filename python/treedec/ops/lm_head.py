import torch

from . import _library
from ._backend import choose_backend, requested_backend
from ._checks import check_projection

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lm_head_backend(device: torch.device, dtype: torch.dtype, op: str = "lm_head_topk") -> str:
    """The backend `op` runs for weights of `dtype` on `device`: `lm_head_topk`, or an op whose
    main pass is its Triton kernel (`draft_heads_topk`).

    fp32 on a GPU goes to torch (cuBLAS GEMM, then topk) under TREEDEC_BACKEND=auto: on an H100
    the Triton kernel's fp32 path took 142-298 us against torch's 92-140 us at V=49152, H=576,
    N=1..32, while in bf16 it took 26-58 us against 75-104 us
    (bench/results/h100/kernels_gpu_rest.csv)."""
    backend = choose_backend(device, op)
    gpu = torch.device(device).type == "cuda"
    if gpu and backend == "triton" and dtype == torch.float32 and requested_backend() == "auto":
        return FP32_GPU_BACKEND
    return backend


FP32_GPU_BACKEND = "reference"  # see lm_head_backend; the GPU tests also run it as "triton"


def lm_head_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the LM-head logits without the caller handling [N, V] logits.

    Parameters
    ----------
    hidden : [N, H]
    weight : [V, H]
        The LM head's weight (same dtype as hidden).
    k : int
        1 <= k <= V. k == 1 is greedy's argmax (ties go to the smallest id).

    Returns
    -------
    values : float32 [N, k], largest first
    indices : int64 [N, k]
    """
    check_projection("hidden", hidden, weight, FLOAT_DTYPES)
    if not isinstance(k, int) or not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k = {k!r} must be an int in [1, {weight.shape[0]}]")
    backend = lm_head_backend(hidden.device, hidden.dtype)
    if _library.compiling():
        return torch.ops.treedec.lm_head_topk(hidden, weight, k, backend)
    return _library.implementation("lm_head_topk", backend)(hidden, weight, k)
