"""tools/sass_loops.py: finding the decode kernel's step loop in nvdisasm output."""

from __future__ import annotations

from tests.scripts import load_script

sass_loops = load_script("tools/sass_loops.py")

# nvdisasm -c layout: an outer loop (.L_x_1) around a two-MMA inner loop (.L_x_2) and a
# one-MMA tail loop (.L_x_3), one predicated branch out of the inner loop.
SASS = """
        .text._Z6kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IMAD R2, R3, 0x4, R4 ;
.L_x_2:
        /*0020*/                   LOP3.LUT R5, R6, 0xf000f, R7, 0xea, !PT ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0040*/              @!P0 BRA `(.L_x_4) ;
        /*0050*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
.L_x_3:
        /*0070*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0080*/               @P2 BRA `(.L_x_3) ;
.L_x_4:
        /*0090*/               @P3 BRA `(.L_x_1) ;
        /*00a0*/                   EXIT ;
"""


def test_parse_finds_opcodes_labels_and_branches():
    (name, (opcodes, labels, branches)), = sass_loops.parse(SASS).items()
    assert name == "_Z6kernelv"
    assert opcodes[:3] == ["MOV", "IMAD", "LOP3.LUT"] and len(opcodes) == 11
    assert labels == {".L_x_1": 1, ".L_x_2": 2, ".L_x_3": 7, ".L_x_4": 9}
    assert [i for i, _ in branches] == [4, 6, 8, 9]  # the predicate is stripped


def test_step_loop_is_the_innermost_loop_with_the_most_mmas(capsys):
    (_, (opcodes, labels, branches)), = sass_loops.parse(SASS).items()
    loops = sass_loops.mma_loops(opcodes, labels, branches)
    # the forward branch to .L_x_4 is no loop; the outer loop holds both inner ones
    assert sorted((x.start, x.end, x.count("HMMA")) for x in loops) == [
        (1, 9, 3), (2, 6, 2), (7, 8, 1)]
    sass_loops.report("k", opcodes, loops, mma_per_tile=1)
    out = capsys.readouterr().out
    assert "step loop: 5 instructions, 2 HMMA, 2 tiles: 2 per tile (instructions 2-6)" in out
    assert "HMMA 2, BRA 2, LOP3 1" in out
    # a step loop with part of a tile's MMAs (the sparse gather kernel's) has no per-tile
    # figure; it divided by zero tiles before
    sass_loops.report("k", opcodes, loops, mma_per_tile=16)
    assert "2 HMMA, fewer than a tile's 16 (instructions 2-6)" in capsys.readouterr().out


# nvdisasm -gi layout: a chain of "//## File" lines (innermost call first) before the
# instructions it covers; a chain without "inlined at" is the kernel's own line.
SASS_LINES = """
        .text._Z6kernelv:
	//## File "k.cuh", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
	//## File "frag.cuh", line 85 inlined at "k.cuh", line 40
	//## File "k.cuh", line 40 inlined at "k.cuh", line 90
	//## File "k.cuh", line 90
        /*0010*/                   LOP3.LUT R5, R6, 0xf000f, R7, 0xea, !PT ;
        /*0020*/                   LOP3.LUT R5, R6, 0xf000f0, R7, 0xea, !PT ;
	//## File "k.cuh", line 41 inlined at "k.cuh", line 90
	//## File "k.cuh", line 90
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
"""


def test_locations_follow_the_inlined_call_chains():
    (name, locs), = sass_loops.locations(SASS_LINES).items()
    assert name == "_Z6kernelv" and len(locs) == 4
    assert locs[0] == (("k.cuh", 10),)
    assert locs[1] == locs[2] == (("frag.cuh", 85), ("k.cuh", 40), ("k.cuh", 90))
    assert locs[3] == (("k.cuh", 41), ("k.cuh", 90))
    # the statement of the loop body: the caller of the outermost inlined call
    assert [sass_loops.statement(x) for x in locs] == [
        ("k.cuh", 10), ("k.cuh", 40), ("k.cuh", 40), ("k.cuh", 41)]
    assert sass_loops.statement(()) is None


def test_report_lines_counts_per_tile_by_statement(capsys):
    (_, (opcodes, _, _)), = sass_loops.parse(SASS_LINES).items()
    (_, locs), = sass_loops.locations(SASS_LINES).items()
    loop = sass_loops.Loop(1, 3, opcodes)
    sass_loops.report_lines(opcodes, locs, loop, tiles=2, top=5)
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["1.0", "k.cuh:40", "LOP3"]  # 2 instructions over 2 tiles
    assert out[2].split()[:3] == ["0.5", "k.cuh:41", "HMMA"]


def test_compile_instantiation_builds_with_setup_pys_flags(tmp_path, monkeypatch):
    """The instruction budget and --by-line look at the SASS the extension builds: the
    same nvcc flags (-lineinfo among them), for sm_90a."""
    commands = []
    monkeypatch.setattr(sass_loops.subprocess, "run",
                        lambda cmd, check: commands.append(cmd))
    sass_loops.compile_instantiation("bf16", 4, 128, 1, sparse=False, channel_k=False,
                                     out=tmp_path / "decode.cubin")
    (cmd,) = commands
    flags = sass_loops.nvcc_flags()
    assert cmd[0] == "nvcc" and cmd[1 : 1 + len(flags)] == flags
    assert "-lineinfo" in flags and "-O3" in flags and sass_loops.ARCH in cmd
    source = (tmp_path / "decode.cu").read_text()
    assert "decode_kernel<__nv_bfloat16, 128, 4, 128, 1, false, false, 0, false>" in source
