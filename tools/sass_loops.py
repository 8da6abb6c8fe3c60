"""Static SASS of the decode kernel's main loop, without a GPU: instructions per tile.

The decode kernel is bound by instruction issue on an H200 (docs/decode-kernel-notes.md),
so the count of instructions in its softmax-step loop is a cheap first check of a change
before any GPU time is spent. This tool compiles one instantiation of ``decode_kernel``
for sm_90a with nvcc, disassembles it with nvdisasm, finds the loops (backward branches)
that contain tensor-core MMAs, and prints the innermost one's instruction count and
opcode histogram.

    python tools/sass_loops.py                                  # bf16, 4 bits, group 128, gqa <= 8
    python tools/sass_loops.py --dtype fp16 --bits 2 --group 32 --head-tiles 2
    python tools/sass_loops.py --cubin build/x.cubin            # any cubin, every kernel
    python tools/sass_loops.py --by-line 15                     # where the loop's code comes from

A static count is an upper bound on what one pass executes (it includes rarely taken
branches: ring refills, barrier retries, the rescale when the running max moves); compare
two versions of the kernel, not against ncu's executed counts. nvdisasm is not part of a
minimal CUDA toolkit; ``pip install nvidia-cuda-nvdisasm`` provides it (found on PATH or
in that package).
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half"}
ARCH = "-gencode=arch=compute_90a,code=sm_90a"


@dataclass
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int  # index of the backward branch
    opcodes: list[str]

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def count(self, prefix: str) -> int:
        return sum(op.startswith(prefix) for op in self.opcodes[self.start : self.end + 1])


def find_nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia.cu13 as pkg  # the nvidia-cuda-nvdisasm wheel for CUDA 13
    except ImportError:
        pkg = None
    for root in getattr(pkg, "__path__", []):
        candidate = Path(root) / "bin" / "nvdisasm"
        if candidate.exists():
            return str(candidate)
    raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put the CUDA "
                     "toolkit's bin/ on PATH)")


def have_tools() -> bool:
    """Whether nvcc and nvdisasm are both here (the CPU tests that compile skip if not)."""
    if shutil.which("nvcc") is None:
        return False
    try:
        find_nvdisasm()
    except SystemExit:
        return False
    return True


def disassemble(cubin: Path, line_info: bool = False) -> str:
    """``nvdisasm -c`` of a cubin (``-gi`` adds the source lines of a -lineinfo build)."""
    flags = ["-c", "-gi"] if line_info else ["-c"]
    return subprocess.run([find_nvdisasm(), *flags, str(cubin)], check=True,
                          capture_output=True, text=True).stdout


def nvcc_flags(setup_py: Path = ROOT / "setup.py") -> list[str]:
    """The literal strings of setup.py's ``NVCC_FLAGS`` (its include and -gencode entries,
    computed there, are left out: the callers pass their own), so that what these tools
    disassemble is what the extension builds."""
    tree = ast.parse(setup_py.read_text())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "NVCC_FLAGS"):
            return [e.value for e in node.value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    raise SystemExit(f"no NVCC_FLAGS list in {setup_py}")


def compile_cubin(source: Path, out: Path, include: Path = ROOT / "csrc" / "include",
                  flags: list[str] | None = None) -> None:
    """``source`` built for sm_90a as a cubin, with setup.py's nvcc flags unless others
    are given (which hold -lineinfo, so ``disassemble(..., line_info=True)`` can name
    source lines)."""
    subprocess.run(["nvcc", *(nvcc_flags() if flags is None else flags), ARCH,
                    f"-I{include}", "-cubin", str(source), "-o", str(out)], check=True)


def compile_instantiation(dtype: str, bits: int, group: int, head_tiles: int,
                          sparse: bool, channel_k: bool, out: Path,
                          fp8_params: bool = False) -> None:
    """One ``decode_kernel`` instantiation as a cubin (``compile_cubin``)."""
    args = (f"{DTYPES[dtype]}, 128, {bits}, {group}, {head_tiles}, {str(sparse).lower()}, "
            f"{str(channel_k).lower()}, 0, {str(fp8_params).lower()}")
    src = out.with_suffix(".cu")
    src.write_text('#include "bitdecode/decode_kernel.cuh"\n'
                   f"template __global__ void bitdecode::decode_kernel<{args}>("
                   "bitdecode::DecodeParams);\n")
    compile_cubin(src, out)


# an instruction line of nvdisasm -c: /*offset*/ text ;
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);")


def function_lines(sass: str) -> list[tuple[str, list[str]]]:
    """The disassembly's functions: name and lines of each, in order."""
    return [(chunk.split(":", 1)[0].strip(), chunk.splitlines())
            for chunk in re.split(r"\n\s*\.text\.", sass)[1:]]


def parse(sass: str) -> dict[str, tuple[list[str], dict[str, int], list[tuple[int, str]]]]:
    """Per function: opcodes in order, label -> index, and (index, text) of branches."""
    functions = {}
    for name, lines in function_lines(sass):
        opcodes, labels, branches = [], {}, []
        for line in lines:
            label = re.match(r"^\s*(\.L_x_\d+):", line)
            if label:
                labels[label.group(1)] = len(opcodes)
                continue
            inst = INSTRUCTION.match(line)
            if inst:
                text = re.sub(r"^@!?U?P[T0-9]+\s+", "", inst.group(1).strip())  # predicate
                op = text.split()[0]
                if op.startswith("BRA"):
                    branches.append((len(opcodes), text))
                opcodes.append(op)
        functions[name] = (opcodes, labels, branches)
    return functions


Location = tuple[tuple[str, int], ...]  # (file, line) of the code, innermost call first


def locations(sass: str) -> dict[str, list[Location]]:
    """Per function of ``nvdisasm -gi`` output (a cubin built with -lineinfo): each
    instruction's source location with the chain of inlined calls it sits in, in the
    order of :func:`parse`'s opcodes."""
    out: dict[str, list[Location]] = {}
    for name, lines in function_lines(sass):
        locs: list[Location] = []
        chain: list[tuple[str, int]] = []
        fresh = False  # the next comment line starts a new chain
        for line in lines:
            m = re.match(r'^\s*//## File "([^"]+)", line (\d+)', line)
            if m:
                if fresh:
                    chain, fresh = [], False
                chain.append((m.group(1), int(m.group(2))))
            elif INSTRUCTION.match(line):
                locs.append(tuple(chain))
                fresh = True
        out[name] = locs
    return out


def statement(loc: Location) -> tuple[str, int] | None:
    """The statement of the loop's own body that an instruction belongs to: the caller
    of the outermost inlined call (the kernel's loop calls its step as a lambda), or the
    line itself when nothing is inlined."""
    if not loc:
        return None
    return loc[-2] if len(loc) >= 2 else loc[-1]


def report_lines(opcodes: list[str], locs: list[Location], loop: Loop, tiles: int | None,
                 top: int) -> None:
    """The loop's static instructions per tile (per pass of the loop where the tiles per
    pass are unknown: None) by the statement they come from, largest first, with each
    statement's commonest opcodes and its source text."""
    unit = "per tile" if tiles else "per pass of the loop"
    tiles = tiles or 1
    per: dict[tuple[str, int] | None, collections.Counter] = collections.defaultdict(
        collections.Counter)
    for i in range(loop.start, loop.end + 1):
        per[statement(locs[i])][opcodes[i].split(".")[0]] += 1
    rows = sorted(per.items(), key=lambda kv: -sum(kv[1].values()))
    print(f"  by statement of the loop body, static instructions {unit} (top {top}):")
    texts: dict[str, list[str]] = {}
    for where, ops in rows[:top]:
        text = ""
        if where is not None:
            path = Path(where[0])
            if path.exists():
                lines = texts.setdefault(where[0], path.read_text().splitlines())
                text = lines[where[1] - 1].strip() if where[1] <= len(lines) else ""
        place = "?" if where is None else f"{Path(where[0]).name}:{where[1]}"
        mix = ", ".join(f"{op} {n / tiles:g}" for op, n in ops.most_common(3))
        print(f"  {sum(ops.values()) / tiles:6.1f}  {place:<24} {mix:<36} {text[:60]}")


def mma_loops(opcodes: list[str], labels: dict[str, int],
              branches: list[tuple[int, str]]) -> list[Loop]:
    loops = []
    for index, text in branches:
        target = re.search(r"(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), index + 1) <= index:
            loop = Loop(labels[target.group(1)], index, opcodes)
            if loop.count("HMMA"):
                loops.append(loop)
    return loops


def step_loop(loops: list[Loop]) -> Loop | None:
    """The steady-state softmax step: of the innermost MMA loops (holding no other), the
    one with the most MMAs (the others are the tail step of one tile)."""
    inner = [a for a in loops
             if not any(b is not a and a.start <= b.start and b.end <= a.end for b in loops)]
    return max(inner, key=lambda x: (x.count("HMMA"), -x.size)) if inner else None


def report(name: str, opcodes: list[str], loops: list[Loop], mma_per_tile: int | None,
           locs: list[Location] | None = None, top: int = 0) -> None:
    print(f"{name}\n  {len(opcodes)} instructions, {len(loops)} loops with MMAs")
    step = step_loop(loops)
    if step is None:
        return
    mmas = step.count("HMMA")
    hist = collections.Counter(op.split(".")[0] for op in opcodes[step.start : step.end + 1])
    per_tile = ""
    tiles = mmas // mma_per_tile if mma_per_tile else 0
    if tiles:
        per_tile = f", {tiles} tiles: {step.size / tiles:.0f} per tile"
    elif mma_per_tile:  # the innermost MMA loop holds part of a tile (the sparse gather's)
        per_tile = f", fewer than a tile's {mma_per_tile}"
    print(f"  step loop: {step.size} instructions, {mmas} HMMA{per_tile} "
          f"(instructions {step.start}-{step.end})")
    print("  " + ", ".join(f"{op} {n}" for op, n in hist.most_common()))
    if locs and top:
        report_lines(opcodes, locs, step, tiles or None, top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--bits", type=int, choices=(4, 2), default=4)
    ap.add_argument("--group", type=int, choices=(32, 64, 128), default=128)
    ap.add_argument("--head-tiles", type=int, choices=(1, 2), default=1,
                    help="1: up to 8 query heads per KV head, 2: up to 16")
    ap.add_argument("--sparse", action="store_true", help="the sparse (reuse-layer) kernel")
    ap.add_argument("--channel-k", action="store_true",
                    help="the per-channel K kernel (its loop holds the own page's path too, "
                         "so no per-tile figure)")
    ap.add_argument("--fp8-params", action="store_true",
                    help="with --channel-k: the K params in e4m3 (k_params='fp8')")
    ap.add_argument("--cubin", type=Path, help="disassemble this cubin instead")
    ap.add_argument("--by-line", type=int, default=0, metavar="N",
                    help="also the N statements of the loop body that hold the most of its "
                         "instructions (a --cubin must be built with -lineinfo)")
    args = ap.parse_args()
    if args.fp8_params and not args.channel_k:
        ap.error("--fp8-params needs --channel-k")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = args.cubin
        if cubin is None:
            cubin = Path(tmp) / "decode.cubin"
            compile_instantiation(args.dtype, args.bits, args.group, args.head_tiles,
                                  args.sparse, args.channel_k, cubin, args.fp8_params)
        sass = disassemble(cubin, line_info=args.by_line > 0)
    functions = parse(sass)
    if not functions:
        sys.exit("no functions in the disassembly")
    # per 16-token tile and head tile: 8 k-steps of S and 8 m-tiles of O at head size 128
    mma_per_tile = None if args.cubin or args.channel_k else 16 * args.head_tiles
    locs = locations(sass) if args.by_line else {}
    for name, (opcodes, labels, branches) in functions.items():
        report(name, opcodes, mma_loops(opcodes, labels, branches), mma_per_tile,
               locs.get(name), args.by_line)


if __name__ == "__main__":
    main()
