"""The extension's torch ops (``torch.ops.bitdecode.*``), with fake impls for tracing.

The kernels live in ``csrc/``; this module only loads them and states shapes for
torch.compile. Every argument is checked in ``csrc/ops.cpp``.
"""

from __future__ import annotations

import torch

try:
    from vllm_bitdecode import _C  # noqa: F401  (registers torch.ops.bitdecode)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "vllm_bitdecode's CUDA extension is not built; install with "
        "`pip install --no-build-isolation -e .` (needs nvcc and torch 2.11)"
    ) from exc


@torch.library.register_fake("bitdecode::quantize_to_pages")
def _quantize_fake(key, value, slot_mapping, cache, rotation_signs, bits, group_size, block_size):
    return None


@torch.library.register_fake("bitdecode::dequantize_pages")
def _dequantize_fake(cache, block_table, seq_lens, out_start, key_out, value_out, bits,
                     group_size, block_size, max_tokens):
    return None


@torch.library.register_fake("bitdecode::decode")
def _decode_fake(out, q, cache, block_table, seq_lens, partial_out, partial_lse,
                 rotation_signs, softmax_scale, bits, group_size, block_size, num_splits,
                 min_tiles_per_split):
    return None


quantize_to_pages = torch.ops.bitdecode.quantize_to_pages
dequantize_pages = torch.ops.bitdecode.dequantize_pages
decode = torch.ops.bitdecode.decode
decode_ctas_per_sm = torch.ops.bitdecode.decode_ctas_per_sm
