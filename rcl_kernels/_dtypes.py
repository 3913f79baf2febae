"""The dtypes the losses take and the dtype they accumulate in: the one table of the package."""

import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, LSE, sums and gradients accumulate in float32 for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_names(dtypes) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)
