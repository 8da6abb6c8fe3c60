"""The engine-core process unpickles vLLM's config before it loads plugins."""

import pickle
import subprocess
import sys

import vllm_bitdecode


def test_backend_member_unpickles_in_a_process_without_the_plugin(tmp_path):
    vllm_bitdecode.register()
    from vllm.config import AttentionConfig

    blob = tmp_path / "config.pkl"
    blob.write_bytes(pickle.dumps(AttentionConfig(backend="BITDECODE")))
    code = (
        "import pickle, sys; from vllm.v1.attention.backends.registry import "
        "AttentionBackendEnum as E; assert 'BITDECODE' not in E.__members__; "
        f"c = pickle.loads(open({str(blob)!r}, 'rb').read()); "
        "assert c.backend is E.BITDECODE, c.backend; print(c.backend.get_class().get_name())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"VLLM_PLUGINS": "", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("BITDECODE")
