"""Reading a compiled kernel's main loop and dot layouts (`parallax.kernels.aot.structure`) on
hand-written PTX and TTGIR in the shapes LLVM and Triton print them."""
from parallax.kernels.aot.structure import duplicated_dots, loop_structure, main_loop

# Two nested loops: the inner one (BB0_4, its body split over two blocks, one
# of them placed before the header) holds more MMAs than the outer one.
PTX = """
// %bb.0:
\tbar.sync \t0;
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2;
$L__BB0_2:                              // =>This Loop Header: Depth=1
                                        //     Child Loop BB0_4 Depth 2
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r2}, {%r3}, {%r4}, {%r5};
\tbar.sync \t0;
$L__BB0_6:                              //   in Loop: Header=BB0_4 Depth=2
\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r6}, %rd3, %rd4;
\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r6}, %rd5, %rd6;
\tbar.sync \t0;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r7, %r8, %r9, %r10}, [%r11];
$L__BB0_4:                              // %.lr.ph
                                        //   Parent Loop BB0_2 Depth=1
                                        // =>  This Inner Loop Header: Depth=2
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r12}, %rd7, %rd8;
\tbar.sync \t0;
// %bb.5:                               //   in Loop: Header=BB0_4 Depth=2
\tbar.sync \t0;
$L__BB0_7:                              // %._crit_edge
                                        //   in Loop: Header=BB0_2 Depth=1
\tbar.sync \t0;
$L__BB0_9:
\tret;
"""

TTGIR = """
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 8, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [2, 16], warpsPerCTA = [8, 1], order = [1, 0]}>
%a = ttng.warp_group_dot %k, %q, %c: !ttg.memdesc<128x128xbf16> * !ttg.memdesc<128x32xbf16> -> tensor<128x32xf32, #mma>
%b = ttng.warp_group_dot %k, %q, %c: !ttg.memdesc<64x128xbf16> * !ttg.memdesc<128x32xbf16> -> tensor<64x32xf32, #mma>
%c = ttng.warp_group_dot %k, %q, %c: !ttg.memdesc<64x128xbf16> * !ttg.memdesc<128x16xbf16> -> tensor<64x16xf32, #mma1>
%d = tt.dot %x, %y, %z : tensor<32x16xbf16> * tensor<16x64xbf16> -> tensor<32x64xf32, #mma2>
%e = tt.dot %x, %y, %z : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32, #blocked>
"""


def test_main_loop_is_the_loop_with_most_mma_and_counts_its_whole_body():
    mma, wgmma, barriers, ldmatrix = main_loop(PTX)
    assert dict(mma) == {"m64n32k16": 2, "m64n128k16": 1}
    assert wgmma and barriers == 3 and ldmatrix == 1


def test_no_loop_gives_empty_structure():
    assert main_loop("// %bb.0:\n\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1};\n") == (
        {}, False, 0, 0)


def test_duplicated_dots_are_those_whose_warps_span_more_than_the_tile():
    # 128x32 on [8, 1] x 16 rows: exact. 64x32 on [8, 1]: twice the rows.
    # 64x16 on [4, 2] x n8: exact. 32x64 on mma.sync [4, 1]: 64 rows for 32.
    # 16x16 blocked over 8 warps: 16 rows, 16 columns, exact.
    assert duplicated_dots(TTGIR) == (5, 2)


def test_loop_structure_text():
    structure = loop_structure(TTGIR, PTX)
    assert structure.mma_text() == "2 m64n32k16 + 1 m64n128k16"
    assert (structure.barriers, structure.ldmatrix, structure.dots, structure.duplicated) == (3, 1, 5, 2)
    mma_sync = loop_structure("", PTX.replace("wgmma.mma_async", "mma"))
    assert mma_sync.mma_text().startswith("mma ") and not mma_sync.wgmma
