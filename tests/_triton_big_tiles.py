"""A Triton kernel the interpreter runs at any size but a GPU may not: a dot of two 128x128 fp32 tiles
stages 128 KB in shared memory, more than an sm_86 GPU gives a block (for tests/test_triton_check.py)."""
import triton
import triton.language as tl


@triton.jit
def tile_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
    b = tl.load(b_ptr + i[:, None] * BLOCK + i[None, :])
    tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, b))
