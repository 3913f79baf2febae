import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, LSE, sums and gradients accumulate in float32 for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
