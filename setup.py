"""Build script for vllm-bitdecode: the Python package plus one CUDA extension.

Install with:  pip install --no-build-isolation -e .

Environment variables:
  BITDECODE_CUDA_ARCHS  CUDA architectures to build, ";" or " " separated (default "90a").
                        Each entry becomes -gencode=arch=compute_XX,code=sm_XX.
  CUDA_HOME             CUDA toolkit root (default: found from nvcc on PATH, then /usr/local/cuda).
  MAX_JOBS              Parallel ninja compile jobs.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
TORCH_REQUIRED = "2.11"  # major.minor; must match install_requires below
DEFAULT_ARCHS = "90a"


def _fail(msg: str) -> None:
    raise RuntimeError(f"vllm-bitdecode build: {msg}")


# ---------------------------------------------------------------- torch
try:
    import torch
except ImportError as exc:
    raise RuntimeError(
        "vllm-bitdecode build: torch is not importable; run `pip install vllm==0.20.0` first, "
        "then `pip install --no-build-isolation -e .`"
    ) from exc

_torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
if _torch_mm != TORCH_REQUIRED:
    _fail(
        f"torch {torch.__version__} found but torch=={TORCH_REQUIRED}.x is required; "
        "run `pip install vllm==0.20.0` (it pins torch==2.11.0)"
    )


# setuptools < 70.1 needs the separate `wheel` package for (editable) wheels; with
# --no-build-isolation pip does not install it, and the failure is an obscure
# "invalid command 'bdist_wheel'". Python 3.11 venvs ship setuptools 65.
try:
    import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
except ImportError:
    try:
        import wheel  # noqa: F401
    except ImportError:
        _fail("the `wheel` package is missing (setuptools < 70.1); run `pip install wheel`")


# ---------------------------------------------------------------- ninja
# Without ninja, torch silently falls back to a serial distutils build that ignores MAX_JOBS.
# pip's ninja wheel installs into the venv's bin/, which is not on PATH unless it is activated.
if shutil.which("ninja") is None:
    _venv_bin = os.path.dirname(sys.executable)
    if os.access(os.path.join(_venv_bin, "ninja"), os.X_OK):
        os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")
    else:
        _fail("ninja not found; run `pip install ninja`")


# ---------------------------------------------------------------- CUDA toolkit
def _is_cuda_home(path: str | None) -> bool:
    return bool(path) and os.access(os.path.join(path, "bin", "nvcc"), os.X_OK)


def _has_headers(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _find_cuda_home() -> str:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        env = os.environ.get(var)
        if env:
            if not _is_cuda_home(env):
                _fail(
                    f"{var}={env} has no bin/nvcc; point {var} at a CUDA 13 toolkit "
                    "(e.g. /usr/local/cuda) or unset it"
                )
            return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc); ask nvcc for its root.
        try:
            out = subprocess.run(
                [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if m:
                candidates.append(os.path.realpath(m.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if _is_cuda_home(cand) and _has_headers(cand):
            return cand
    _fail(
        "nvcc not found; install the CUDA 13 toolkit and put its bin/ on PATH "
        "or set CUDA_HOME (e.g. export CUDA_HOME=/usr/local/cuda)"
    )
    raise AssertionError  # unreachable


CUDA_HOME = _find_cuda_home()
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc")
os.environ["CUDA_HOME"] = CUDA_HOME

try:
    _nvcc_ver = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True)
except (OSError, subprocess.CalledProcessError) as exc:
    raise RuntimeError(f"vllm-bitdecode build: `{NVCC} --version` failed; check CUDA_HOME") from exc
_m = re.search(r"release (\d+)\.(\d+)", _nvcc_ver.stdout)
if _m and torch.version.cuda and _m.group(1) != torch.version.cuda.split(".")[0]:
    _fail(
        f"nvcc {_m.group(1)}.{_m.group(2)} at {NVCC} does not match torch's CUDA "
        f"{torch.version.cuda}; use a CUDA {torch.version.cuda.split('.')[0]}.x toolkit"
    )


# ---------------------------------------------------------------- architectures
def _parse_archs(spec: str) -> list[str]:
    archs = []
    for tok in re.split(r"[;,\s]+", spec.strip()):
        if not tok:
            continue
        norm = re.sub(r"^(sm_|compute_)", "", tok.lower()).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", norm):
            _fail(f"bad entry {tok!r} in BITDECODE_CUDA_ARCHS; use e.g. '90a' or '90a;100a'")
        if norm not in archs:
            archs.append(norm)
    if not archs:
        _fail("BITDECODE_CUDA_ARCHS is empty; use e.g. '90a' or '90a;100a'")
    return archs


ARCHS = _parse_archs(os.environ.get("BITDECODE_CUDA_ARCHS") or DEFAULT_ARCHS)
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]


def _torch_arch(arch: str) -> str:
    """'90a' -> '9.0a', '100a' -> '10.0a', '120' -> '12.0' (TORCH_CUDA_ARCH_LIST spelling)."""
    digits, suffix = re.fullmatch(r"(\d+)([af]?)", arch).groups()
    return f"{digits[:-1]}.{digits[-1]}{suffix}"


# Keep torch's own arch logic in line with ours. torch adds no arch flags of its own when
# -gencode flags are passed explicitly (and with no GPU visible and no TORCH_CUDA_ARCH_LIST
# it would fail); set it anyway so any torch code path sees the same list.
os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(_torch_arch(a) for a in ARCHS)

# Imported only now: torch.utils.cpp_extension reads CUDA_HOME at import time.
from torch.utils import cpp_extension  # noqa: E402

cpp_extension.CUDA_HOME = CUDA_HOME  # in case it was imported earlier with another guess
BuildExtension = cpp_extension.BuildExtension
CUDAExtension = cpp_extension.CUDAExtension


# ---------------------------------------------------------------- sources
def _sources() -> list[str]:
    cu = [p for p in ROOT.glob("csrc/**/*.cu") if p.is_file()]
    cpp = [p for p in ROOT.glob("csrc/*.cpp") if p.is_file()]
    return sorted(p.relative_to(ROOT).as_posix() for p in cu + cpp)


SOURCES = _sources()
if not SOURCES:
    _fail("no sources found (csrc/**/*.cu, csrc/*.cpp); is this a complete checkout?")


def _fallback_include_flags() -> list[str]:
    """-isystem flags for CUDA library headers that the toolkit lacks.

    torch's ATen/cuda/CUDAContext.h includes cusparse.h, cublas_v2.h, cublasLt.h and
    cusolverDn.h. A minimal toolkit (nvcc + cudart only) lacks them, but the pip wheels that
    torch depends on (site-packages/nvidia/cu13/include, or nvidia/<lib>/include) ship them.
    -isystem is searched after every -I, so the toolkit's own headers still win.
    """
    needed = ["cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h"]
    missing = [h for h in needed if not os.path.isfile(os.path.join(CUDA_HOME, "include", h))]
    if not missing:
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    dirs: list[str] = []
    for header in missing:
        found = sorted(p for r in roots for p in Path(r).glob(f"*/include/{header}"))
        if not found:
            _fail(
                f"{header} is neither in {CUDA_HOME}/include nor in the nvidia pip packages; "
                "install the full CUDA 13 toolkit or reinstall torch==2.11.0"
            )
        d = str(found[0].parent)
        if d not in dirs:
            dirs.append(d)
    return [f for d in dirs for f in ("-isystem", d)]


EXTRA_INCLUDES = _fallback_include_flags()


def _libstdcxx_flags() -> list[str]:
    """Link libstdc++ dynamically even where the compiler has only the static archive.

    On a machine with g++ but without libstdc++'s development link (libstdc++.so next to
    libstdc++.a, as on the lent GPU machine's Ubuntu 24.04 with g++ 13.3), `-lstdc++`
    quietly links the archive: the extension then carries its own copy of the iostreams,
    and the first TORCH_CHECK message it formats (an ostringstream built from that copy
    against locale state owned by torch's shared libstdc++) crashes the process with a
    segfault instead of raising RuntimeError. Naming the runtime library avoids it."""
    import sysconfig

    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []  # the development link exists: -lstdc++ is the shared library already
    print(f"setup.py: {cxx} has no libstdc++.so link; linking -l:libstdc++.so.6 explicitly")
    return ["-l:libstdc++.so.6"]


def _rpath_flags() -> list[str]:
    """rpath to torch's libs (and the cudart torch ships) so `import vllm_bitdecode._C` loads
    even before `import torch`; a no-op when torch is imported first, as usual."""
    import importlib.util

    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        hits = sorted(Path(root).glob("*/lib/libcudart.so.*"))
        if hits:
            dirs.append(str(hits[0].parent))
            break
    return [f"-Wl,-rpath,{d}" for d in dirs]


CXX_FLAGS = ["-O3", "-std=c++17", *EXTRA_INCLUDES]
NVCC_FLAGS = [
    *EXTRA_INCLUDES,
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    # torch adds -D__CUDA_NO_HALF_OPERATORS__ etc.; undo that, as vLLM's own build does.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    # No --use_fast_math: the quantizer relies on IEEE division.
    *GENCODE,
]

ext_modules = [
    CUDAExtension(
        name="vllm_bitdecode._C",
        sources=SOURCES,
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=_rpath_flags() + _libstdcxx_flags(),
    )
]

setup(
    name="vllm-bitdecode",
    version="0.1.0",
    description="BITDECODE attention backend for vLLM: 4/2-bit paged KV cache with CUDA kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_bitdecode", "vllm_bitdecode.*"]),
    install_requires=["vllm==0.20.0", "torch==2.11.0"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"vllm.general_plugins": ["bitdecode = vllm_bitdecode:register"]},
    zip_safe=False,
)
