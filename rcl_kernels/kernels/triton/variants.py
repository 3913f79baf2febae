"""The Triton backend's variants: each a set of constexpr flags of the same kernels, so a variant
shares every line of code it does not change. Pure data (no Triton import): the registry lists
the variants as candidates ("triton:<name>") on machines without Triton too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A selectable form of the kernels. Variant() is the form timed on the H100
    (docs/gpu-status.md); every other value is untimed until bench/triton_configs.py has
    run on a GPU, so nothing selects one by default. Every variant computes the same op and meets
    the same tolerances (tests/test_kernels_triton.py)."""

    # Logits in log2 units: scale·log2(e) folded into one multiply, biases pre-scaled, exp2.
    exp2: bool = False
    # Mask only the tiles that need it (the diagonal band of the self mask, partial tiles) and
    # drop the masks of full tiles (EVEN_M / EVEN_N / EVEN_D specializations).
    lean_masks: bool = False
    # Forward: load the [BLOCK_M, d] row tile of Z once and keep it across the column loop
    # (d ≤ 256; larger d streams it as the default does).
    resident_z: bool = False
    # Forward: programs in groups of this many row blocks across every column split (a swizzle
    # for L2 reuse of Z tiles); 1 = row blocks fastest, as launched. With one column split (large
    # N) the order is the same either way: every program streams all of K.
    group_m: int = 1
    # Forward: autotune also over 128-wide tiles with 8 warps and 3-4 stages.
    wide_configs: bool = False
    # Backward: "two_pass" (dz and dk kernels, each recomputes S) or "one_pass" (S once per tile,
    # dk in registers, dz added across column blocks; for tensor-core products up to d = 256
    # (bf16/fp16) or 128 (TF32): fp32 FMA, 3xTF32 and larger d run two passes).
    backward: str = "two_pass"
    # one_pass: dz added in a fixed order (True: bitwise reproducible) or by fp32 atomics.
    deterministic: bool = True
    # fp32 without TF32 ("highest"): "ieee" (FMA products) or "tf32x3" (3xTF32: each operand as
    # a sum of two TF32 parts, three tensor-core products).
    fp32_highest: str = "ieee"

    def __post_init__(self):
        for name in ("exp2", "lean_masks", "resident_z", "wide_configs", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Variant.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.group_m, bool) or not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"Variant.group_m must be an int >= 1, got {self.group_m!r}")
        if self.fp32_highest not in ("ieee", "tf32x3"):
            raise ValueError(f"Variant.fp32_highest must be 'ieee' or 'tf32x3', got "
                             f"{self.fp32_highest!r}")
        if self.backward not in ("two_pass", "one_pass"):
            raise ValueError(f"Variant.backward must be 'two_pass' or 'one_pass', got "
                             f"{self.backward!r}")

    @staticmethod
    def of(variant: "Variant | str") -> "Variant":
        """A Variant, or the preset of that name in VARIANTS."""
        if isinstance(variant, Variant):
            return variant
        if isinstance(variant, str) and variant in VARIANTS:
            return VARIANTS[variant]
        raise ValueError(f"variant must be a Variant or one of {sorted(VARIANTS)}, got {variant!r}")


_FORWARD_ALL = dict(exp2=True, lean_masks=True, resident_z=True, wide_configs=True)
# Named presets, a ladder from the timed kernels to every forward flag: bench/triton_configs.py
# times each, so one GPU run shows what every step buys.
VARIANTS: dict[str, Variant] = {
    "default": Variant(),
    "exp2": Variant(exp2=True),
    "exp2-lean": Variant(exp2=True, lean_masks=True),
    "exp2-lean-resident": Variant(exp2=True, lean_masks=True, resident_z=True),
    "forward-all": Variant(**_FORWARD_ALL),
    "forward-all-grouped": Variant(**_FORWARD_ALL, group_m=8),
    "one-pass": Variant(**_FORWARD_ALL, backward="one_pass"),
    "one-pass-atomic": Variant(**_FORWARD_ALL, backward="one_pass", deterministic=False),
    "3xtf32": Variant(fp32_highest="tf32x3"),
}
