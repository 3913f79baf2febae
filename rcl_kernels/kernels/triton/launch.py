"""The Triton backend's host side: buffers, split counts, grids and launches of the kernels, and
the two entry points the ops call (lse_forward, lse_backward).

The passes are also the backend's tooling API: bench/triton_configs.py times `forward`, `dz_pass`,
`dk_pass` and `one_pass` one config at a time on a `BackwardInputs`, and tests run each config and
split count explicitly. `splits=` and `config=` choose what the planner and the autotuner would
otherwise choose; results are the same op either way.

Tiling: rows are read with any stride but d with unit stride (a view with another feature stride
is copied once); offsets of a row or split (row · stride, which passes 2^31 at N = 2^21 anchors)
are 64-bit, offsets inside a tile 32-bit. dz and dk are returned in float32 (the caller rounds
once, after adding its own terms). For dk the row weights g are first divided by max|g| so that
g·p stays in [−1, 1] (fp16 would otherwise underflow for the tiny g of a mean over many anchors)
and max|g| is multiplied back in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import planner
from . import INTERPRETED
from .configs import (
    _INTERP_META,
    KERNELS,
    _autotuned,
    _block_d,
    input_precision,
    backward_kernels,
    chunk_meta,
    kernel_configs,
    variant_meta,
)
from .forward import _merge_kernel
from .variants import Variant

# Split lengths are multiples of the largest BLOCK_M/BLOCK_N of any config, so only the last tile of
# a split is partial (interpreter: 16, so that small tests exercise the splits too). The planner
# counts a reduction in tiles of this length.
_SPLIT_ALIGN = 16 if INTERPRETED else 128
_NOMINAL_BLOCK = 64  # block size assumed when counting the programs of a grid
# Largest tile height of any config: a row stride times this must stay below 2^31 (in-tile offsets
# are 32-bit, see _row_offset).
_MAX_TILE_ROWS = 128
_MAX_SPLITS = {"forward": 64, "dz": 16, "dk": 16}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bucket(x: int) -> int:
    """Power-of-two bucket used as an autotune key (tuning once per size class, not per size)."""
    return 1 << max(0, int(x) - 1).bit_length()


def _alloc(shape, device, dtype) -> torch.Tensor:
    """Every output/partial buffer comes from here (tests replace it to poison buffers with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def split_layout(kernel: str, parallel_programs: int, reduce_len: int,
                 partial_bytes_per_split: int, device: torch.device,
                 count: int | None = None) -> tuple[int, int]:
    """(length of each split, number of splits) of a reduction of `reduce_len` rows or columns.

    `count`: the split count asked for (a pass's `splits=`); None asks the planner. The length is
    a multiple of _SPLIT_ALIGN, which can leave fewer splits than asked for."""
    if count is None:
        count = planner.reduction_splits(
            parallel_programs, _cdiv(reduce_len, _SPLIT_ALIGN), device=device,
            max_splits=_MAX_SPLITS[kernel], partial_bytes_per_split=partial_bytes_per_split)
    per = _cdiv(_cdiv(reduce_len, max(1, count)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return per, max(1, _cdiv(reduce_len, per))



def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along d (vectorized loads) and a row stride that keeps in-tile offsets
    32-bit; rows may otherwise have any stride (a view is copied only when it breaks one)."""
    if (x.shape[1] > 1 and x.stride(1) != 1) or x.stride(0) * _MAX_TILE_ROWS >= 2**31:
        return x.contiguous()
    return x


def _common_args(z, k):
    n, m = z.shape[0], k.shape[0]
    return dict(stride_zm=z.stride(0), stride_km=k.stride(0), N_KEY=bucket(n), M_KEY=bucket(m))



def _launch(name, configs, grid, args, kwargs, config):
    """Run kernel `name`: one given triton.Config (tests, benchmarks), fixed small blocks when
    interpreted, or autotuned over `configs`."""
    if config is not None:
        KERNELS[name][1][grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)
    elif INTERPRETED:
        KERNELS[name][1][grid](*args, **kwargs, **_INTERP_META[name])
    else:
        _autotuned(name, tuple(configs))[grid](*args, **kwargs)


def forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
            variant=Variant(), num_splits=None, config=None):
    """lse [N] float32 (lse_forward), with the split count and config given or None (the
    planner's and the autotuner's)."""
    n, d = z.shape
    m = k.shape[0]
    device = z.device
    lse = _alloc((n,), device, torch.float32)
    if n == 0:
        return lse
    if m == 0:
        return lse.fill_(float("-inf"))
    row_labels, col_labels = row_labels.contiguous(), col_labels.contiguous()
    z, k = _kernel_layout(z), _kernel_layout(k)
    row_bias, col_bias = row_bias.contiguous(), col_bias.contiguous()
    # Partials: a running max and a sum of exponentials per row and split.
    cols_per_split, num_splits = split_layout("forward", _cdiv(n, _NOMINAL_BLOCK), m, 8 * n,
                                              device, num_splits)
    if num_splits > 1:
        mpart = _alloc((num_splits, n), device, torch.float32)
        spart = _alloc((num_splits, n), device, torch.float32)
    else:
        mpart = spart = lse  # unused (WRITE_LSE)
    grid = lambda meta: (_cdiv(n, meta["BLOCK_M"]), num_splits)  # noqa: E731
    _launch(
        "forward", kernel_configs("forward", variant, d), grid,
        (z, k, row_labels, col_labels, row_bias, col_bias, lse, mpart, spart,
         n, m, d, cols_per_split, int(self_offset), float(scale)),
        dict(**_common_args(z, k), INPUT_PRECISION=input_precision(z.dtype, allow_tf32, variant),
             WRITE_LSE=num_splits == 1, **variant_meta("forward", variant, d)),
        config,
    )
    if num_splits > 1:
        block = 128
        _merge_kernel[(_cdiv(n, block),)](mpart, spart, lse, n, num_splits, BLOCK=block)
    return lse


@dataclass(frozen=True)
class BackwardInputs:
    """The backward's inputs in kernel layout; each pass below launches one kernel on them (the
    benchmark times the passes one by one)."""

    g: torch.Tensor  # grad_lse in fp32
    z: torch.Tensor
    k: torch.Tensor
    row_labels: torch.Tensor
    col_labels: torch.Tensor
    row_bias: torch.Tensor
    col_bias: torch.Tensor
    lse: torch.Tensor
    self_offset: int
    scale: float
    allow_tf32: bool
    variant: Variant

    @staticmethod
    def of(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
           allow_tf32, variant) -> "BackwardInputs":
        return BackwardInputs(grad_lse.to(torch.float32).contiguous(), _kernel_layout(z),
                         _kernel_layout(k), row_labels.contiguous(), col_labels.contiguous(),
                         row_bias.contiguous(), col_bias.contiguous(), lse.contiguous(),
                         int(self_offset), float(scale), allow_tf32, Variant.of(variant))

    def kernel_args(self, *outputs) -> tuple:
        """Tensor arguments of the dz/dk/one-pass kernels: inputs, lse, g, then `outputs`."""
        return (self.z, self.k, self.row_labels, self.col_labels, self.row_bias, self.col_bias,
                self.lse, self.g, *outputs)

    def scalars(self, reduce_per_split: int) -> tuple:
        n, d = self.z.shape
        return (n, self.k.shape[0], d, reduce_per_split, self.self_offset, self.scale)

    def precision(self) -> str:
        return input_precision(self.z.dtype, self.allow_tf32, self.variant)

    def meta(self, kernel: str) -> dict:
        return dict(**_common_args(self.z, self.k), **variant_meta(kernel, self.variant,
                                                                   self.z.shape[1]),
                    INPUT_PRECISION=self.precision())

    def gmax(self) -> torch.Tensor:
        """max |g|, by which the dk products divide g (see the module docstring)."""
        return self.g.abs().amax().reshape(1)


def _two_pass(kernel: str, b: BackwardInputs, parallel: int, reduced: int, parallel_block: str,
              extra_args: tuple, splits, config) -> torch.Tensor:
    """The dz or dk kernel: programs over blocks of the `parallel` axis (dz: the N rows, dk: the M
    columns; `parallel_block` is the config's block along it) times d chunks, the `reduced` axis
    split when those do not fill the GPU. Split partials are summed in a fixed order:
    deterministic."""
    d, device = b.z.shape[1], b.z.device
    d_chunks = _cdiv(d, _block_d(d, b.z.dtype))
    per_split, splits = split_layout(kernel, _cdiv(parallel, _NOMINAL_BLOCK) * d_chunks, reduced,
                                     4 * parallel * d, device, splits)
    out = _alloc((splits, parallel, d), device, torch.float32)
    grid = lambda meta: (_cdiv(parallel, meta[parallel_block]), d_chunks, splits)  # noqa: E731
    _launch(kernel, kernel_configs(kernel, b.variant, d), grid,
            (*b.kernel_args(*extra_args, out), *b.scalars(per_split)),
            dict(b.meta(kernel), **chunk_meta(kernel, d, b.z.dtype, b.precision())), config)
    return out[0] if splits == 1 else out.sum(0)


def dz_pass(b: BackwardInputs, splits=None, config=None) -> torch.Tensor:
    """dz: row-parallel; the columns split when row blocks x d chunks do not fill the GPU."""
    return _two_pass("dz", b, b.z.shape[0], b.k.shape[0], "BLOCK_M", (), splits, config)


def dk_pass(b: BackwardInputs, splits=None, config=None) -> torch.Tensor:
    """dk: column-parallel; the rows split when needed (M ≫ N is the usual case, so rarely)."""
    return _two_pass("dk", b, b.k.shape[0], b.z.shape[0], "BLOCK_N", (b.gmax(),), splits, config)


def _one_pass_sems(n: int, device) -> torch.Tensor:
    """The deterministic one-pass kernel's counters, zeroed (every launch needs fresh ones, as
    the CUDA mma kernels' workspace): the ticket counter, then one turn counter per row block of
    the smallest BLOCK_M of any config (16)."""
    return torch.zeros((1 + _cdiv(n, 16),), device=device, dtype=torch.int32)


def one_pass(b: BackwardInputs, splits=None, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """dz, dk by the one-pass kernel: dz accumulates in place (zeroed first), dk in the same
    row-split partials as the two-pass dk kernel."""
    (n, d), m, device = b.z.shape, b.k.shape[0], b.z.device
    rows_per_split, splits = split_layout("dk", _cdiv(m, _NOMINAL_BLOCK), n, 4 * m * d, device,
                                          splits)
    dz = _alloc((n, d), device, torch.float32).zero_()
    dk_out = _alloc((splits, m, d), device, torch.float32)
    sem = _one_pass_sems(n, device)
    grid = lambda meta: (_cdiv(m, meta["BLOCK_N"]) * splits,)  # noqa: E731
    _launch("one_pass", kernel_configs("one_pass", b.variant, d), grid,
            (*b.kernel_args(b.gmax(), dz, dk_out, sem), *b.scalars(rows_per_split)),
            b.meta("one_pass"), config)
    return dz, (dk_out[0] if splits == 1 else dk_out.sum(0))


def backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
             allow_tf32, variant=Variant(), dz_splits=None, dk_splits=None, dz_config=None,
             dk_config=None, one_pass_config=None):
    """(dz, dk) float32 (lse_backward), with split counts and configs given or None."""
    n, d = z.shape
    m = k.shape[0]
    if n == 0 or m == 0 or d == 0:
        return (torch.zeros((n, d), device=z.device, dtype=torch.float32),
                torch.zeros((m, d), device=z.device, dtype=torch.float32))
    b = BackwardInputs.of(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse,
                          self_offset, scale, allow_tf32, variant)
    if backward_kernels(variant, d, z.dtype, allow_tf32) == ("one_pass",):
        return one_pass(b, dk_splits, one_pass_config)
    return dz_pass(b, dz_splits, dz_config), dk_pass(b, dk_splits, dk_config)


def lse_forward(z: torch.Tensor, k: torch.Tensor, row_labels: torch.Tensor,
                col_labels: torch.Tensor, row_bias: torch.Tensor, col_bias: torch.Tensor,
                self_offset: int, scale: float, allow_tf32: bool, *,
                variant: Variant | str = "default") -> torch.Tensor:
    """lse [N] float32 of the masked, biased logits (the op: rcl_kernels.kernels.triton).

    The caller validates shapes, dtypes (float32, bfloat16, float16) and devices
    (rcl_kernels.kernels.contract). `variant`: a Variant or the name of one in VARIANTS."""
    return forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                   allow_tf32, Variant.of(variant))


def lse_backward(grad_lse: torch.Tensor, z: torch.Tensor, k: torch.Tensor,
                 row_labels: torch.Tensor, col_labels: torch.Tensor, row_bias: torch.Tensor,
                 col_bias: torch.Tensor, lse: torch.Tensor, self_offset: int, scale: float,
                 allow_tf32: bool, *,
                 variant: Variant | str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(dz [N, d], dk [M, d]) in float32 for grad_lse [N] and the lse of lse_forward.

    The gradients stay in the accumulation dtype (csrc/ops.cpp): the caller adds the positive-term
    gradients before the single rounding to the input dtype."""
    return backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset,
                    scale, allow_tf32, Variant.of(variant))
