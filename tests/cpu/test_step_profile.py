"""vllm_bitdecode.step_profile (kernel names to categories, busy time, the difference of
two profiles) and benchmarks/bench_step_breakdown.py's records and main flow with a
stand-in engine."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tests.scripts import load_script
from vllm_bitdecode import step_profile
from vllm_bitdecode.step_profile import Kernel

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# names as the CUDA profiler reported them on an H200 (benchmarks/results/step_breakdown*
# top_kernels; FlashAttention's and vLLM's cut where those files cut them), one or more per
# category
NAMES = {
    "void bitdecode::decode_kernel<__nv_bfloat16, 128, 4, 128, 1, false, false, 0, false>"
    "(bitdecode::DecodeParams)": "attention",
    # the reuse and selection layers of sparse decode, per-channel K
    "void bitdecode::decode_kernel<__nv_bfloat16, 128, 4, 128, 1, true, false, 0, false>"
    "(bitdecode::DecodeParams)": "attention",
    "void bitdecode::decode_kernel<__nv_bfloat16, 128, 4, 128, 1, false, false, 1, false>"
    "(bitdecode::DecodeParams)": "attention",
    "void bitdecode::decode_kernel<__nv_bfloat16, 128, 2, 32, 1, false, true, 0, false>"
    "(bitdecode::DecodeParams)": "attention",
    "void bitdecode::select_topk_kernel<1024>(bitdecode::SelectParams)": "attention",
    "void bitdecode::dequantize_kernel<__nv_bfloat16, 128, 4, 128, false, false>"
    "(bitdecode::DequantizeParams)": "attention",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<"
    "flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<":
        "attention",
    "void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, "
    "false, cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::b": "attention",
    "void flash::prepare_varlen_num_blocks_kernel<1, false>(int, int, int, int const*, int "
    "const*, int const*, int const*, int const*, int const*, int, int, int, int": "attention",
    "void bitdecode::combine_kernel<__nv_bfloat16, 128>(bitdecode::DecodeParams)":
        "attention combine",
    "void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>, "
    "cute::C<128> >, 5, 256, 1, false, true, cutlass::bfloat16_t, float, cutlass::arch":
        "attention combine",
    "void flash::flash_fwd_splitkv_combine_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, "
    "false, false, cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cu":
        "attention combine",
    "void bitdecode::quantize_kernel<__nv_bfloat16, 128, 4, 128>(bitdecode::QuantizeParams)":
        "KV-cache write",
    "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, unsigned char, "
    "(vllm::Fp8KVCacheDataType)1>(__nv_bfloat16 const*, __nv_bfloat16 const*, unsigned char*,":
        "KV-cache write",
    # per-channel K (k_mode "channel"): full pages' K quantized; V quantized and the
    # residual written by one kernel since 2026-12-03
    "void bitdecode::kc_page_kernel<__nv_bfloat16, 128, 2, false>(bitdecode::KCWriteParams)":
        "KV-cache write",
    "void bitdecode::kc_value_residual_kernel<__nv_bfloat16, 128, 2, 32>"
    "(bitdecode::KCWriteParams)": "KV-cache write",
    "_tq_decode_stage1": "attention",  # TURBOQUANT (vLLM's Triton kernels)
    "_fwd_kernel_stage2": "attention combine",
    "_tq_fused_store_mse": "KV-cache write",
    "nvjet_sm90_tst_256x96_64x4_1x2_h_bz_coopA_TNT": "GEMM",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "GEMM",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled elementwise (torch.compile)",
    "triton_poi_fused_mul_silu_slice_1": "compiled elementwise (torch.compile)",
    "Memcpy HtoD (Pinned -> Device)": "copies and fills",
    "Memset (Device)": "copies and fills",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, "
    "at::native::ArgMaxOps<float> > >(...)": "other PyTorch ops",
    "some_new_kernel": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_names_fall_in_their_category(name):
    assert step_profile.category(name) == NAMES[name]


def test_busy_time_counts_overlapping_kernels_once():
    ks = [Kernel("a", 0, 10), Kernel("b", 5, 12), Kernel("c", 20, 25), Kernel("d", 21, 22)]

    def busy(kernels):
        return step_profile.summarize(kernels)["busy_us"]

    assert busy(ks) == pytest.approx(12 + 5)
    assert busy(list(reversed(ks))) == pytest.approx(17)  # order-free
    assert busy([]) == 0.0


def test_overlapping_time_goes_to_the_kernel_that_started_first():
    """A dependent launch (the combine) starts 2 us into the decode and waits: only its
    3 us after the decode ends are its own; the shares sum to the busy time."""
    decode, combine = Kernel("decode", 0, 20), Kernel("combine", 2, 23)
    copy, alone = Kernel("copy", 5, 9), Kernel("gemm", 30, 40)
    shares = dict((k.name, us) for k, us in
                  step_profile.attributed_us([alone, combine, copy, decode]))
    assert shares == {"decode": 20, "combine": 3, "copy": 0, "gemm": 10}
    assert sum(shares.values()) == \
        step_profile.summarize([decode, combine, copy, alone])["busy_us"] == 33
    tie = step_profile.attributed_us([Kernel("short", 0, 5), Kernel("long", 0, 8)])
    assert [(k.name, us) for k, us in tie] == [("long", 8), ("short", 0)]


def _profile(steps: int, prefill_us: float = 500.0, prefill_attention_us: float = 0.0
             ) -> dict:
    """A stand-in engine's profile: a prefill (a GEMM, then an attention kernel where
    ``prefill_attention_us`` is given), then per decode token a GEMM of 40 us, an attention
    kernel of 20 us overlapping a 4 us copy on another stream, and a 6 us gap."""
    ks, t = [Kernel("nvjet_prefill_gemm", 0, prefill_us)], prefill_us
    if prefill_attention_us:
        ks.append(Kernel("void flash::prepare_varlen_num_blocks_kernel<1, false>()", t,
                         t + prefill_attention_us))
        t += prefill_attention_us
    for _ in range(steps):
        ks += [Kernel("nvjet_tst_gemm", t, t + 40),
               Kernel("void bitdecode::decode_kernel<4>()", t + 40, t + 60),
               Kernel("Memcpy HtoD (Pageable -> Device)", t + 50, t + 54)]
        t += 66
    return step_profile.summarize(ks)


def test_per_step_is_the_difference_of_two_profiles_over_the_window():
    """The prefill and the first tokens cancel: only the steps between the two runs
    count, per step, in ms; the copy hidden under the attention kernel counts once, in
    the attention's busy time, and in the kernels' own sum."""
    p = step_profile.per_step(_profile(1 + 8), _profile(1 + 16), 8)
    cats = p["categories_ms"]
    assert cats["GEMM"] == pytest.approx(0.040) and cats["attention"] == pytest.approx(0.020)
    assert cats["copies and fills"] == 0.0 and cats["other"] == 0.0
    assert set(cats) == set(step_profile.CATEGORY_NAMES)
    assert sum(cats.values()) == pytest.approx(p["gpu_busy_ms"])
    assert p["kernel_ms"] == pytest.approx(0.064)
    assert p["gpu_busy_ms"] == pytest.approx(0.060)
    assert p["launches"] == pytest.approx(3.0)
    top = p["top_kernels"]
    assert [k["category"] for k in top] == ["GEMM", "attention", "copies and fills"]
    assert top[0]["launches"] == pytest.approx(1.0)
    assert top[2]["ms"] == 0.0 and top[2]["span_ms"] == pytest.approx(0.004)
    assert all(k["name"] != "nvjet_prefill_gemm" for k in top)  # launched once in both
    with pytest.raises(ValueError, match="steps"):
        step_profile.per_step(_profile(1), _profile(1), 0)


def test_kernels_launched_as_often_in_both_runs_are_left_out():
    """A prefill kernel that took 3 us longer in one run (noise: on an H200 a FlashAttention
    planning kernel of the prefill, 0.04 ms a step after the division) is no decode step's
    work: neither a category nor the busy time counts it, nor a slower prefill GEMM."""
    p = step_profile.per_step(_profile(1 + 8, prefill_attention_us=5.0),
                              _profile(1 + 16, prefill_us=510.0, prefill_attention_us=8.0), 8)
    assert p["categories_ms"]["attention"] == pytest.approx(0.020)
    assert p["categories_ms"]["GEMM"] == pytest.approx(0.040)
    assert p["gpu_busy_ms"] == pytest.approx(0.060)
    assert sum(p["categories_ms"].values()) == pytest.approx(p["gpu_busy_ms"])
    assert all("prefill" not in k["name"] and "prepare_varlen" not in k["name"]
               for k in p["top_kernels"])


def test_profile_decode_profiles_the_window_after_a_warm_up(monkeypatch):
    """1 + n and 1 + 2n tokens from the same prompts, greedy, after a warm-up of 2."""
    seen = []

    class LLM:
        def generate(self, prompts, sp, use_tqdm=False):
            seen.append(sp.max_tokens)

    def fake_profile(llm, prompts, params):
        llm.generate(prompts, params)
        return _profile(params.max_tokens)

    monkeypatch.setattr(step_profile, "_profile_generate", fake_profile)
    p = step_profile.profile_decode(LLM(), types.SimpleNamespace, [{"prompt_token_ids": [5]}],
                                    steps=4)
    assert seen == [2, 5, 9] and p["steps"] == 4
    assert p["categories_ms"]["GEMM"] == pytest.approx(0.040)


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    return load_script("benchmarks/bench_step_breakdown.py")


def _engine_result(spec: dict) -> dict:
    """What run_engine returns for a spec: a timing and a profile per decode shape."""
    timings, profiles = [], []
    bd = spec.get("backend") == "BITDECODE"
    for t in spec["decode_timings"]:
        timings.append(dict(batch=t["batch"], context=t["context"], steps=t["steps"],
                            ms_per_step=7.5 if bd else 12.5, ms_per_step_each=[7.5, 7.6],
                            ms_per_step_wall_each=[7.9, 7.2], clock="engine",
                            gpu_in_long_runs={"samples": 12, "sw_power_cap_fraction": 1.0}))
    for p in spec["decode_profiles"]:
        prof = step_profile.per_step(_profile(1 + p["steps"]), _profile(1 + 2 * p["steps"]),
                                     p["steps"])
        profiles.append(prof | {"batch": p["batch"], "context": p["context"]})
    return {"decode_timings": timings, "decode_profiles": profiles, "log": "engine log"}


def test_engine_spec_profiles_each_timed_shape(bench):
    s, shapes = bench.e2e.decode_settings(64, 0.9, False, bench.CASES)
    spec = bench.engine_spec("BITDECODE:int4", "m", s, 16, shapes)
    assert [(p["batch"], p["context"], p["steps"]) for p in spec["decode_profiles"]] == \
        [(1, 130560, 16), (8, 32768, 16)]
    assert [(t["batch"], t["context"]) for t in spec["decode_timings"]] == \
        [(1, 130560), (8, 32768)]
    assert spec["enforce_eager"] is False and "_decode_shapes" not in spec
    json.dumps(spec)  # travels as JSON to the engine process
    assert spec["max_num_seqs"] == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile-steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--backends", "nonsense"])


@pytest.mark.parametrize("text", ["192", "192x", "x6144", "0x6144", "192x-1", "a x b", ","])
def test_bad_shapes_are_refused(bench, text):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", text])


def test_shapes_replace_the_default_cases(bench, monkeypatch, tmp_path):
    specs = []

    def engine(spec, timeout):
        specs.append(spec)
        return _engine_result(spec)

    monkeypatch.setattr(bench.e2e, "run_in_subprocess", engine)
    monkeypatch.setattr(bench.e2e, "device_name", lambda: "NVIDIA Test GPU")
    monkeypatch.setattr(bench.e2e, "write_model_dir", lambda path, tokenizer: path)
    out = tmp_path / "breakdown.json"
    bench.main(["--backends", "int4", "--shapes", "192x6144, 4X100", "--steps", "32",
                "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    (spec,) = specs
    # the engine runs the largest batch in one step and captures a graph for it
    assert spec["max_num_seqs"] == 192
    assert 192 in spec["compilation_config"]["cudagraph_capture_sizes"]
    assert [(t["batch"], t["context"], t["steps"]) for t in spec["decode_timings"]] == \
        [(192, 6144, 32), (4, 100, 32)]
    assert [(p["batch"], p["context"]) for p in spec["decode_profiles"]] == \
        [(192, 6144), (4, 100)]
    doc = json.loads(out.read_text())
    assert [(r["case"], r["batch"], r["context"]) for r in doc["records"]] == \
        [("decode_192x6144", 192, 6144), ("decode_4x100", 4, 100)]
    assert doc["settings"]["max_num_seqs"] == 192
    assert all(r["ms_per_step"] == 7.5 for r in doc["records"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "8x1024", "--quick"])


def test_main_flow_with_a_stand_in_engine(bench, monkeypatch, tmp_path, capsys):
    specs = []

    def engine(spec, timeout):
        specs.append(spec)
        if spec.get("kv_cache_dtype") == "fp8":
            raise RuntimeError("CUDA out of memory")
        return _engine_result(spec)

    monkeypatch.setattr(bench.e2e, "run_in_subprocess", engine)
    monkeypatch.setattr(bench.e2e, "device_name", lambda: "NVIDIA Test GPU")
    monkeypatch.setattr(bench.e2e, "write_model_dir", lambda path, tokenizer: path)
    out = tmp_path / "breakdown.json"
    bench.main(["--quick", "--backends", "bf16,fp8,int4", "--out", str(out), "--log-dir",
                str(tmp_path / "logs")])
    doc = json.loads(out.read_text())
    assert doc["device"] == "NVIDIA Test GPU" and doc["settings"]["profile_steps"] == 16
    by = {(r["key"], r["case"]): r for r in doc["records"]}
    r = by[("BITDECODE:int4", "decode_b8_32k")]
    assert r["ms_per_step"] == 7.5 and r["gpu_busy_ms"] == pytest.approx(0.060)
    assert r["clock"] == "engine" and r["ms_per_step_wall_each"] == [7.9, 7.2]
    assert r["gpu_in_long_runs"] == {"samples": 12, "sw_power_cap_fraction": 1.0}
    assert r["host_gap_ms"] == pytest.approx(7.5 - 0.060)
    assert r["categories_ms"]["attention"] == pytest.approx(0.020)
    assert r["top_kernels"][0]["category"] == "GEMM"
    failed = by[("FLASH_ATTN:fp8", "decode_b1_128k")]
    assert failed["skipped"].startswith("engine failed") and failed["context"] == 32768
    assert len(specs) == 3 and (tmp_path / "logs" / "BITDECODE_int4.log").exists()
    table = capsys.readouterr().out
    assert "skipped: engine failed" in table and "KV write" in table
