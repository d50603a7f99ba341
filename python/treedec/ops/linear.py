import torch

from .. import reference
from . import _cpp
from ._checks import check_projection, check_same_device, check_tensor
from .registry import Op

LINEAR_DTYPES = (torch.float32, torch.bfloat16)

LINEAR_ROWS = Op("linear_rows", "(Tensor x, Tensor weight, Tensor? bias, str backend) -> Tensor", reference.linear_rows,
                 lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0]), cpp=_cpp.linear_rows)


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer for the few rows of a verify step: x @ weight.T + bias.

    On the CPU the C++ kernel streams the weight once for all rows with the LM head's register
    tiles; torch's fp32 matmul is several times slower for 1 to 8 rows of a weight that is not
    in cache (bench/kernels.py, `linear_rows`). Other devices run torch.

    Parameters
    ----------
    x : [N, H], float32 or bfloat16
    weight : [O, H], same dtype
    bias : [O] or None

    Returns
    -------
    [N, O] in x's dtype (bf16: float32 sums rounded to nearest even)
    """
    check_projection("x", x, weight, LINEAR_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, LINEAR_DTYPES, 1)
        check_same_device(x=x, bias=bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries; weight has {weight.shape[0]} rows")
    return LINEAR_ROWS(x, weight, bias)


def loop_linear_rows(device: torch.device):
    """The function `linear_rows` runs on `device` under the current TREEDEC_BACKEND, without the
    per-call argument checks and backend choice: for a caller whose tensors are known to fit (the
    decode loop's own nn.Linear weights and activations, layers.py), which calls it about 200
    times a step. Look it up again when TREEDEC_BACKEND or the thread count may have changed."""
    backend = LINEAR_ROWS.backend(device)
    return _cpp.linear_rows_runner() if backend == "cpp" else LINEAR_ROWS.implementation(backend)
