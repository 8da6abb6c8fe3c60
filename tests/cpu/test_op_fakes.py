"""Every op that bindings.cpp declares has a fake impl in ops.py (for torch.compile's
tracing) whose parameters are the schema's, in order, defaults included. Read from the
sources, so it runs without the built extension."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _schemas() -> dict[str, list[tuple[str, str | None]]]:
    """op name -> [(parameter, default or None)] from the m.def(...) strings."""
    src = (ROOT / "csrc" / "bindings.cpp").read_text()
    out = {}
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", src):
        schema = "".join(re.findall(r"\"([^\"]*)\"", call))
        name, params = re.match(r"(\w+)\((.*)\)\s*->", schema).groups()
        parsed = []
        for p in filter(None, (x.strip() for x in params.split(","))):
            decl, _, default = p.partition("=")
            parsed.append((decl.split()[-1], default.strip() or None))
        out[name] = parsed
    return out


def _fakes() -> dict[str, list[tuple[str, str | None]]]:
    """op name -> [(parameter, default source or None)] of its register_fake function."""
    tree = ast.parse((ROOT / "vllm_bitdecode" / "ops.py").read_text())
    out = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for dec in fn.decorator_list:
            if (isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "register_fake"):
                op = dec.args[0].value.split("::")[1]
                args = fn.args.args
                defaults = [None] * (len(args) - len(fn.args.defaults)) + [
                    ast.unparse(d) for d in fn.args.defaults]
                out[op] = [(a.arg, d) for a, d in zip(args, defaults, strict=True)]
    return out


def test_every_op_with_outputs_has_a_fake_with_the_schema_parameters():
    schemas, fakes = _schemas(), _fakes()
    assert len(schemas) >= 9 and set(fakes) <= set(schemas)
    # decode_ctas_per_sm returns an int at start-up, outside any traced graph
    assert set(schemas) - set(fakes) == {"decode_ctas_per_sm"}
    for op, fake in fakes.items():
        assert fake == schemas[op], f"{op}: fake {fake} != schema {schemas[op]}"
