"""`python -m council_fast.devtools.compile_check`: its reading of ptxas's resource report (CI runs the nvcc
compile itself, which takes minutes)."""
from __future__ import annotations

from council_fast.devtools.compile_check import parse_ptxas_report, report_resources

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12_GLOBAL__N_115backward_kernelILi0ELi0EEEvPKfS2_PKvS2_S2_S2_S2_S2_S2_S4_PvS5_NS_5ShapeElNS_6PixelsES7_S7_S7_NS_7BuffersE' for 'sm_90'
ptxas info    : Function properties for _ZN12_GLOBAL__N_115backward_kernelILi0ELi0EEEvPKfS2_PKvS2_S2_S2_S2_S2_S2_S4_PvS5_NS_5ShapeElNS_6PixelsES7_S7_S7_NS_7BuffersE
    6208 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 6208 bytes cumulative stack size, 968 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN12_GLOBAL__N_114forward_kernelILi64ELi12EEEvPKvPKfPvNS_5ShapeENS_6PixelsE' for 'sm_90'
ptxas info    : Function properties for _ZN12_GLOBAL__N_114forward_kernelILi64ELi12EEEvPKvPKfPvNS_5ShapeENS_6PixelsE
    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 968 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN12_GLOBAL__N_116fwd_plane_kernelILb1ELb1EfEEvPKT1_PKfS6_S3_PS1_PfS8_lf' for 'sm_80'
ptxas info    : Function properties for _ZN12_GLOBAL__N_116fwd_plane_kernelILb1ELb1EfEEvPKT1_PKfS6_S3_PS1_PfS8_lf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers, 408 bytes cmem[0]
ptxas info    : Function properties for _Z5heavyfi
    4096 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


def test_ptxas_report_is_read_per_kernel_and_architecture():
    kernels = parse_ptxas_report(PTXAS)
    assert [(k.arch, k.registers, k.stack, k.spill_stores) for k in kernels] == [
        ("sm_90", 40, 6208, 0), ("sm_90", 255, 0, 8), ("sm_80", 30, 0, 0)]
    report = report_resources(kernels)
    assert "sm_80: 1 kernels, at most 30 registers, largest stack frame 0 B, 0 spilling" in report
    assert "sm_90: 2 kernels, at most 255 registers, largest stack frame 6208 B, 1 spilling" in report
    assert "backward_kernel<0, 0>: 40 registers, 6208 B stack, 0 B spilled" in report  # a large frame
    assert "forward_kernel<64, 12>: 255 registers, 0 B stack, 8 B spilled" in report  # spills
    assert "fwd_plane_kernel" not in report  # neither; the device function's frame after it is not its own
