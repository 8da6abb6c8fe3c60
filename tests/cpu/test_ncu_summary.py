"""tools/ncu_summary.py reads Nsight Compute's text report (one record per launch)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import ncu_summary  # noqa: E402

REPORT = """==PROF== Connected to process 1
  void decode_kernel<__nv_bfloat16, 128, 4, 128, 1, 0, 0, 0, 0>(DecodeParams) (8, 8, 8)x(128, 1, 1)
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    SM Frequency                    Ghz         1.34
    DRAM Throughput                   %        53.27
    Duration                         us       446.53
    ----------------------- ----------- ------------
    Executed Instructions                           inst  194,514,412
    Registers Per Thread             register/thread             123
    Stall Wait                      inst         1.29
  void combine_kernel<__nv_bfloat16, 128>(DecodeParams) (8, 32, 1)x(256, 1, 1)
    Duration                         us         4.54
    Stall Wait                      inst         1.70
"""


def test_one_record_per_launch_with_its_own_numbers():
    decode, combine = ncu_summary.parse_report(REPORT)
    assert decode["kernel"] == "decode_kernel" and combine["kernel"] == "combine_kernel"
    assert decode["template"] == "__nv_bfloat16, 128, 4, 128, 1, 0, 0, 0, 0"
    assert decode["grid"] == [8, 8, 8] and combine["block"] == [256, 1, 1]
    assert decode["duration_us"] == 446.53 and combine["duration_us"] == 4.54
    assert decode["executed_instructions"] == 194514412
    assert decode["registers"] == 123 and decode["sm_ghz"] == 1.34
    assert decode["stall_wait"] == 1.29 and combine["stall_wait"] == 1.70
    # a metric the launch's section lacks stays None instead of taking the next launch's
    assert combine["executed_instructions"] is None and combine["dram_pct"] is None
