"""Launch settings shared by the kernels: block sizes and warp counts.

A row kernel holds one whole row in registers: the block is the row length rounded up to a
power of two, and wide rows get more warps so each thread keeps few elements (fewer spills).
The thresholds follow the Triton layer-norm tutorial and Liger-Kernel's `calculate_settings`.
"""

from __future__ import annotations

import triton

# The widest row a row kernel holds in one block (elements); wider rows are refused.
MAX_ROW_BLOCK = 65536


def row_block(n_cols: int, *, what: str) -> tuple[int, int]:
    """(block, num_warps) for a kernel that holds a row of `n_cols` elements in one block."""
    if n_cols < 1:
        raise ValueError(f"{what}: the last dimension must be at least 1, got {n_cols}")
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(
            f"{what}: the last dimension is {n_cols}; the Triton kernel holds at most {MAX_ROW_BLOCK}"
        )
    return block, warps_for(block)


def warps_for(block: int) -> int:
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


# Elements a row-tile kernel keeps per program when rows are narrow: several rows share a program
# until the tile holds this many elements.
TILE_ELEMENTS = 4096


def row_tile(n_cols: int, *, what: str) -> tuple[int, int, int]:
    """(block, rows, num_warps): a tile of `rows` rows of `block` columns for a row-wise kernel."""
    block, _ = row_block(n_cols, what=what)
    rows = max(1, TILE_ELEMENTS // block)
    return block, rows, warps_for(block * rows)
