import torch

from .. import reference
from . import _cpp, _triton
from ._checks import check_projection
from .registry import Op, Rule

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def no_cpp_kernel_for_dtype(hidden, *rest) -> str | None:
    return None if hidden.dtype in _cpp.LM_HEAD_DTYPES else f"no C++ kernel for {hidden.dtype}"


def k_past_triton_limit(hidden, weight, k, *rest) -> str | None:
    return f"k = {k} > {_triton.LM_HEAD_MAX_K}, what the kernel keeps per row" if k > _triton.LM_HEAD_MAX_K else None


def fp32_on_gpu(hidden, *rest) -> str | None:
    """On an H100 the Triton kernel's fp32 path took 142-298 us against torch's 92-140 us (cuBLAS
    GEMM, then topk) at V=49152, H=576, N=1..32, while in bf16 it took 26-58 us against 75-104 us
    (bench/results/h100/kernels_gpu_rest.csv)."""
    return "fp32: cuBLAS + topk beat the kernel on an H100" if hidden.dtype == torch.float32 else None


FP32_ON_GPU = Rule("fp32 (cuBLAS + topk is faster, H100)", fp32_on_gpu)

LM_HEAD_TOPK = Op(
    "lm_head_topk", "(Tensor hidden, Tensor weight, int k, str backend) -> (Tensor, Tensor)", reference.lm_head_topk,
    lambda hidden, weight, k: (hidden.new_empty(hidden.shape[0], k, dtype=torch.float32),
                               hidden.new_empty(hidden.shape[0], k, dtype=torch.int64)),
    declines={"cpp": [Rule("fp16 (no C++ kernel)", no_cpp_kernel_for_dtype)],
              "triton": [Rule(f"k > {_triton.LM_HEAD_MAX_K}", k_past_triton_limit)]},
    avoids={"triton": [FP32_ON_GPU]},
    cpp=_cpp.lm_head_topk, triton=_triton.lm_head_topk,
)


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
    return LM_HEAD_TOPK(hidden, weight, k)
