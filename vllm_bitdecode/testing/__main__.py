"""``python -m vllm_bitdecode.testing make-model DIR ...`` writes a model directory;
``python -m vllm_bitdecode.testing SPEC OUT`` runs one engine spec (JSON) and saves its
result to OUT (what :func:`engine.run_in_subprocess` starts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm_bitdecode.testing.engine import run_engine, startup_failure
from vllm_bitdecode.testing.model_dir import make_model_cli


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "make-model":
        make_model_cli(sys.argv[2:])
        return
    import torch

    spec = json.loads(Path(sys.argv[1]).read_text())
    if "startup_failure" in spec:
        torch.save(startup_failure(spec), sys.argv[2])
        return
    torch.save(run_engine(spec), sys.argv[2])


if __name__ == "__main__":
    main()
