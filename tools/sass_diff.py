"""Does a kernel change alter the machine code? Compare SASS against a revision, no GPU.

GPU time is the scarce resource here. A change that leaves every kernel's machine code as
it was (a shared helper instead of two copies, a renamed variable, a comment) needs no
GPU run to be trusted: this tool compiles the instantiation files
(``csrc/instantiations/*.cu``) for sm_90a with the build's own nvcc flags (read from
setup.py), once from ``git archive <base>`` and once from the working tree, disassembles
both with nvdisasm and compares them kernel by kernel:

- ``identical``: the same instructions in the same order (addresses aside);
- ``reordered``: the same instructions in another order. The scheduler's noise usually,
  but not a proof: the moved lines are printed, to be read (two independent
  instructions swapping places are harmless; a load moving past a store may not be);
- ``changed``: instructions added or removed (counts given), or a kernel that only one
  side has. Such a change needs the GPU tests.

    python tools/sass_diff.py                          # working tree against HEAD
    python tools/sass_diff.py --base 082b1ca           # ... against another revision
    python tools/sass_diff.py --files kernels_bf16_4bit.cu --jobs 2

Exit status 0 when every kernel is identical, 1 otherwise. About 5 minutes for the four
files on two cores (eight nvcc runs). nvdisasm: ``pip install nvidia-cuda-nvdisasm``
(tools/sass_loops.py finds it).
"""

from __future__ import annotations

import argparse
import collections
import difflib
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass_loops import (  # noqa: E402
    INSTRUCTION,
    compile_cubin,
    disassemble,
    function_lines,
    nvcc_flags,
)

ROOT = Path(__file__).resolve().parents[1]
LABEL = re.compile(r"\.L_x_\d+")


def kernels(sass: str) -> dict[str, list[str]]:
    """Per kernel of ``nvdisasm -c`` output: its instructions and labels, in order, without
    the addresses. Labels are numbered across the file, so one kernel's new branch would
    renumber every later kernel's: each kernel's are renamed L0, L1, ... in the order they
    first appear in it."""
    out = {}
    for name, lines in function_lines(sass):
        body = []
        for line in lines[1:]:
            inst = INSTRUCTION.match(line)
            if inst:
                body.append(" ".join(inst.group(1).split()))
            elif LABEL.match(line.strip()):
                body.append(line.strip())
        out[name] = _renumber_labels(body)
    return out


def _renumber_labels(body: list[str]) -> list[str]:
    names: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        return names.setdefault(m.group(0), f"L{len(names)}")

    return [LABEL.sub(rename, line) for line in body]


@dataclass
class KernelDiff:
    name: str
    verdict: str  # identical | reordered | changed | only in base | only in new
    added: int = 0
    removed: int = 0
    moved: list[str] = field(default_factory=list)  # the lines that differ, diff-style


def compare(base: dict[str, list[str]], new: dict[str, list[str]]) -> list[KernelDiff]:
    out = []
    for name in sorted(base.keys() | new.keys()):
        if name not in new:
            out.append(KernelDiff(name, "only in base"))
            continue
        if name not in base:
            out.append(KernelDiff(name, "only in new"))
            continue
        a, b = base[name], new[name]
        if a == b:
            out.append(KernelDiff(name, "identical"))
            continue
        moved = [line for line in difflib.unified_diff(a, b, lineterm="", n=0)
                 if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        ca, cb = collections.Counter(a), collections.Counter(b)
        if ca == cb:
            out.append(KernelDiff(name, "reordered", moved=moved))
        else:
            out.append(KernelDiff(name, "changed", added=sum((cb - ca).values()),
                                  removed=sum((ca - cb).values()), moved=moved))
    return out


def compile_sass(source: Path, include: Path, out_dir: Path, flags: list[str]) -> str:
    """nvdisasm's text of ``source`` built for sm_90a; empty for a file that this side
    lacks (its kernels are then "only in" the other)."""
    if not source.exists():
        return ""
    cubin = out_dir / (source.stem + ".cubin")
    compile_cubin(source, cubin, include, flags)
    return disassemble(cubin)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision to compare against")
    ap.add_argument("--files", nargs="*", default=None,
                    help="instantiation files (names in csrc/instantiations); default all")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc runs")
    ap.add_argument("--max-lines", type=int, default=12,
                    help="moved or changed lines printed per kernel")
    args = ap.parse_args()
    files = args.files or sorted(p.name for p in (ROOT / "csrc/instantiations").glob("*.cu"))
    flags = nvcc_flags()
    with tempfile.TemporaryDirectory() as tmp:
        base_root = Path(tmp) / "base"
        base_root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "csrc"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_root)], input=archive, check=True)
        jobs = []
        for side, root in (("base", base_root), ("new", ROOT)):
            out_dir = Path(tmp) / f"out_{side}"
            out_dir.mkdir()
            for f in files:
                jobs.append((side, f, root / "csrc/instantiations" / f,
                             root / "csrc/include", out_dir))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            sass = dict(zip([(side, f) for side, f, *_ in jobs],
                            pool.map(lambda j: compile_sass(*j[2:], flags), jobs), strict=True))
    all_same = True
    for f in files:
        diffs = compare(kernels(sass["base", f]), kernels(sass["new", f]))
        counts = collections.Counter(d.verdict for d in diffs)
        print(f"{f}: {len(diffs)} kernels, "
              + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
        names = demangle([d.name for d in diffs if d.verdict != "identical"])
        for d in diffs:
            if d.verdict == "identical":
                continue
            all_same = False
            extra = f" (+{d.added} / -{d.removed} instructions)" if d.verdict == "changed" else ""
            print(f"  {d.verdict}{extra}: {names.get(d.name, d.name)}")
            for line in d.moved[: args.max_lines]:
                print(f"      {line}")
            if len(d.moved) > args.max_lines:
                print(f"      ... {len(d.moved) - args.max_lines} more lines")
    print(f"against {args.base}: " + ("every kernel identical" if all_same
                                      else "not identical; see above"))
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
