"""CPU checks of vllm_bitdecode.testing: the test tokenizer, engine kwargs, log parsing and
the attention-capture comparison that the GPU serving tests rely on."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import time
import types

import pytest
import torch

from vllm_bitdecode.testing import (
    comparisons,
    engine,
    engine_probes,
    gpu_monitor,
    model_dir,
    server,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return model_dir.write_model_dir(tmp_path_factory.mktemp("tiny"), **model_dir.TINY_LLAMA)


def test_model_dir_has_config_and_a_tokenizer_of_the_model_vocab(tiny_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 32000 and cfg["num_hidden_layers"] == 2
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert len(tok) == cfg["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    # every id the model can sample decodes, and text round-trips word by word
    assert tok.decode([20, 31999]) == "w20 w31999"
    ids = tok("hello , tell me w500").input_ids
    assert ids == [tok.convert_tokens_to_ids(w) for w in ("hello", ",", "tell", "me", "w500")]
    assert tok.decode([20, 2, 21], skip_special_tokens=True) == "w20 w21"


def test_chat_template_renders_and_vllm_reads_it_as_string_content(tiny_dir):
    from vllm.renderers.hf import _detect_content_format
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(str(tiny_dir))
    messages = [{"role": "system", "content": "tell a story"},
                {"role": "user", "content": "hello , tell me a story about the sea ?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("system : tell a story\nuser : hello , tell me a story about the sea ?\n"
                    "assistant :")
    # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x a list
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert len(ids) == 19 and 0 not in ids  # every word known: no <unk>
    assert _detect_content_format(model_dir.CHAT_TEMPLATE, default="openai") == "string"


def test_vllm_random_dataset_samples_with_the_test_tokenizer(tmp_path):
    """`vllm bench throughput/serve --dataset-name random` needs a tokenizer."""
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    model = model_dir.write_model_dir(tmp_path / "m", vocab_size=4096)
    tok = get_tokenizer(str(model))
    reqs = RandomDataset(random_seed=0).sample(tok, num_requests=4, input_len=300,
                                               output_len=7)
    assert [(r.prompt_len, r.expected_output_len) for r in reqs] == [(300, 7)] * 4


def test_make_model_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vllm_bitdecode.testing", "make-model",
                          str(tmp_path / "m"), "--layers", "3", "--vocab-size", "1000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 1000
    assert cfg["hidden_size"] == model_dir.LLAMA3_8B["hidden_size"]
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert "chat_template" in json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("failure", [False, True], ids=["engine", "startup_failure"])
def test_module_entry_runs_a_spec_and_saves_its_result(tmp_path, monkeypatch, failure):
    """``python -m vllm_bitdecode.testing SPEC OUT``, which run_in_subprocess starts: a spec
    goes to run_engine, one with a ``startup_failure`` entry to startup_failure, and the
    result is saved where the parent reads it. (The engines themselves need a GPU.)"""
    from vllm_bitdecode.testing import __main__ as entry

    spec = {"model": "m", **({"startup_failure": {"baseline_used_mib": 0}} if failure else {})}
    calls = []
    monkeypatch.setattr(entry, "run_engine", lambda s: calls.append(("run", s)) or {"ran": 1})
    monkeypatch.setattr(entry, "startup_failure",
                        lambda s: calls.append(("fail", s)) or {"failed": 1})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "spec.json"), str(tmp_path / "o.pt")])
    entry.main()
    assert calls == [("fail" if failure else "run", spec)]
    assert torch.load(tmp_path / "o.pt") == ({"failed": 1} if failure else {"ran": 1})


def test_engine_kwargs_backend_choice_and_passthrough():
    kw = engine.engine_kwargs(dict(model="m", backend="BITDECODE", bitdecode={"bits": 2},
                                    disable_log_stats=False, num_gpu_blocks_override=7,
                                    compilation_config={"cudagraph_capture_sizes": [1, 2]}))
    assert kw["attention_backend"] == "BITDECODE"
    assert kw["additional_config"] == {"bitdecode": {"bits": 2}}
    assert kw["disable_log_stats"] is False and kw["num_gpu_blocks_override"] == 7
    assert kw["compilation_config"] == {"cudagraph_capture_sizes": [1, 2]}
    auto = engine.engine_kwargs(dict(model="m", backend=None,
                                      kv_cache_dtype="turboquant_4bit_nc"))
    assert "attention_backend" not in auto and "additional_config" not in auto
    assert auto["kv_cache_dtype"] == "turboquant_4bit_nc"
    assert engine.engine_kwargs(dict(model="m"))["attention_backend"] == "BITDECODE"


def test_engine_kwargs_are_accepted_by_vllm_engine_args():
    from vllm.engine.arg_utils import EngineArgs

    kw = engine.engine_kwargs(dict(model="m", backend="BITDECODE", disable_log_stats=False,
                                    enable_prefix_caching=True, max_num_batched_tokens=2048,
                                    num_gpu_blocks_override=1100,
                                    compilation_config={"cudagraph_capture_sizes": [1, 8]}))
    args = EngineArgs(**kw)
    assert args.num_gpu_blocks_override == 1100 and args.disable_log_stats is False


def test_parse_kv_cache_tokens():
    log = ("INFO [kv_cache_utils.py:1] GPU KV cache size: 444,112 tokens\n"
           "INFO later GPU KV cache size: 1,671,984 tokens\n")
    assert engine.parse_kv_cache_tokens(log) == 1671984
    assert engine.parse_kv_cache_tokens("nothing here") is None


def _running_means(n: int, dim: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, dim, generator=g) * 2 - 1
    return torch.cumsum(v, 0) / torch.arange(1, n + 1)[:, None]


def test_match_rows_by_position_single_request():
    rows = _running_means(3000)
    ref = {"positions": torch.arange(3000), "rows": rows.bfloat16()}
    same = {"positions": torch.arange(3000).flip(0), "rows": rows.flip(0).bfloat16()}
    errs, overall = comparisons.match_rows_by_position(same, ref)
    assert overall == 0 and float(errs.max()) == 0
    # a chunk that missed its history: rows 1000.. are means over the chunk alone
    bad = rows.clone()
    v = torch.diff(torch.cat([torch.zeros(1, 256), rows * torch.arange(1, 3001)[:, None]]), dim=0)
    bad[1000:] = torch.cumsum(v[1000:], 0) / torch.arange(1, 2001)[:, None]
    errs, overall = comparisons.match_rows_by_position(
        {"positions": torch.arange(3000), "rows": bad.bfloat16()}, ref)
    assert float(errs[:1000].max()) < 1e-2 and float(errs[1000:].min()) > 0.05
    assert overall > 0.3
    # positions the reference never reached
    errs, _ = comparisons.match_rows_by_position(
        {"positions": torch.tensor([5, 4000]), "rows": rows[:2].bfloat16()}, ref)
    assert math.isinf(float(errs[1])) and math.isfinite(float(errs[0]))


def test_match_rows_by_position_picks_the_right_request_of_a_batch():
    a, b = _running_means(500, seed=1), _running_means(800, seed=2)
    ref = {"positions": torch.cat([torch.arange(500), torch.arange(800)]),
           "rows": torch.cat([a, b])}
    # the test run computed b first, then a, then recomputed part of a (preemption)
    test = {"positions": torch.cat([torch.arange(800), torch.arange(500), torch.arange(200)]),
            "rows": torch.cat([b, a, a[:200]]) * (1 + 1e-3)}
    errs, overall = comparisons.match_rows_by_position(test, ref)
    assert float(errs.max()) < 2e-3 and overall < 2e-3
    # a row from neither request is far from both
    test["rows"][-1] = _running_means(200, seed=3)[-1]
    errs, _ = comparisons.match_rows_by_position(test, ref)
    assert float(errs[-1]) > 0.5


def test_greedy_equal_up_to_ties():
    ref = [[1, 2, 3], [4, 5, 6]]
    lps = [[{1: -0.1, 9: -3.0}, {2: -0.5, 7: -0.51}, {3: -0.1, 8: -2.0}],
           [{4: -0.1, 9: -3.0}, {5: -0.1, 9: -3.0}, {6: -0.1, 9: -3.0}]]
    assert comparisons.assert_greedy_equal_up_to_ties(ref, ref, lps, 3, "same") == 0
    # request 0 takes the runner-up where the reference's two best are 0.01 apart
    assert comparisons.assert_greedy_equal_up_to_ties([[1, 7, 0], [4, 5, 6]], ref, lps, 3,
                                                  "tie") == 1
    with pytest.raises(AssertionError, match="token 9 instead of 5"):  # no tie there
        comparisons.assert_greedy_equal_up_to_ties([[1, 2, 3], [4, 9, 6]], ref, lps, 3, "x")
    with pytest.raises(AssertionError, match="did not finish"):
        comparisons.assert_greedy_equal_up_to_ties([[1, 2], [4, 5, 6]], ref, lps, 3, "x")
    many = [[1, 2, 3]] * 9
    many_lps = [[{1: -0.1, 9: -0.11}, {2: -0.1}, {3: -0.1}]] * 9
    with pytest.raises(AssertionError, match="2 requests diverged"):
        comparisons.assert_greedy_equal_up_to_ties([[9, 2, 3]] * 2 + many[2:], many, many_lps, 3,
                                               "many")


def test_greedy_close_follows_vllm_rule():
    ref = [[1, 2, 3], [4, 5, 6]]
    ref_lps = [[{1: -0.1, 9: -3.0}, {2: -0.5, 7: -0.9}, {3: -0.1}],
               [{4: -0.1}, {5: -0.1, 8: -2.0}, {6: -0.1}]]
    assert comparisons.assert_greedy_close(ref, ref_lps, ref, ref_lps, 3, "same") == [None, None]
    # request 0 takes the reference's runner-up at step 1, and the reference's token is
    # among its own top tokens: allowed, compared no further (step 2 differs freely)
    test = [[1, 7, 0], [4, 5, 6]]
    test_lps = [[{1: -0.1}, {7: -0.6, 2: -0.7}, {0: -0.1}], ref_lps[1]]
    assert comparisons.assert_greedy_close(test, test_lps, ref, ref_lps, 3, "ok") == [1, None]
    # a token the reference did not rank, or a reference token the test did not rank
    with pytest.raises(AssertionError, match="request 1, step 1: token 9 instead of 5"):
        comparisons.assert_greedy_close([[1, 2, 3], [4, 9, 6]], ref_lps, ref, ref_lps, 3, "x")
    no_ref_token = [[{1: -0.1}, {7: -0.6, 3: -0.7}, {0: -0.1}], ref_lps[1]]
    with pytest.raises(AssertionError, match="not among"):
        comparisons.assert_greedy_close(test, no_ref_token, ref, ref_lps, 3, "x")
    with pytest.raises(AssertionError, match="did not finish"):
        comparisons.assert_greedy_close([[1, 2], [4, 5, 6]], ref_lps, ref, ref_lps, 3, "x")


def test_teacher_forced_agreement():
    ref = [{"logprob": [-1.0, -2.0], "argmax": [5, 6]}, {"logprob": [-3.0], "argmax": [7]}]
    same = comparisons.teacher_forced_agreement(ref, ref)
    assert same == {"ppl_ratio": 1.0, "argmax_agreement": 1.0, "mean_abs_logprob_diff": 0.0}
    worse = [{"logprob": [-1.3, -2.3], "argmax": [5, 9]}, {"logprob": [-3.3], "argmax": [7]}]
    got = comparisons.teacher_forced_agreement(worse, ref)
    assert got["ppl_ratio"] == pytest.approx(math.exp(0.3))
    assert got["argmax_agreement"] == pytest.approx(2 / 3)
    assert got["mean_abs_logprob_diff"] == pytest.approx(0.3)
    with pytest.raises(ValueError):  # a request of another length
        comparisons.teacher_forced_agreement([{"logprob": [-1.0], "argmax": [5]}, ref[1]], ref)


def test_prompt_logprobs_picks_the_prompt_token_and_the_argmax():
    lp = collections.namedtuple("Logprob", "logprob rank")
    steps = [None, {8: lp(-0.5, 2), 4: lp(-0.2, 1)}, {6: lp(-0.1, 1)}]
    assert engine.teacher_forced_scores([3, 8, 6], steps) == {"logprob": [-0.5, -0.1],
                                                          "argmax": [4, 6]}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    class FakeNvml:
        uuids = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]

        def nvmlDeviceGetCount(self):
            return 3

        def nvmlDeviceGetHandleByIndex(self, i):
            return f"h{i}"

        def nvmlDeviceGetUUID(self, h):
            return self.uuids[int(h[1:])].encode()

    nvml = FakeNvml()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_monitor.visible_gpus(nvml) == ["h0", "h1", "h2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert gpu_monitor.visible_gpus(nvml) == ["h2", "h0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bb, 7")
    assert gpu_monitor.visible_gpus(nvml) == ["h1"]  # by UUID prefix; no device 7


def test_process_cmdline():
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ps = psutil.Process(proc.pid)
        cmd, deadline = "", time.monotonic() + 10
        while "time.sleep(30)" not in cmd and time.monotonic() < deadline:
            cmd = server.process_cmdline(ps)  # "" until the child has exec'd
            time.sleep(0.05)
        assert "time.sleep(30)" in cmd
    finally:
        proc.kill()
        proc.wait()
    assert server.process_cmdline(ps) == ""  # gone


def test_stop_server_ends_the_process_and_its_children():
    """stop_server (vllm_serve's teardown and the soak's): SIGTERM, a clean exit, no
    descendant left; one that ignores SIGTERM is killed and reported as such."""
    # the child leaves when its parent is gone, as vLLM's engine core does
    child = ("import os, time\nparent = os.getppid()\n"
             "while os.getppid() == parent: time.sleep(0.1)")
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             f"subprocess.Popen([sys.executable, '-c', {child!r}]); "
                             "time.sleep(60)"])
    time.sleep(1.0)
    children = server.child_processes(proc.pid)
    assert children, "the stand-in server did not start its child"
    out = server.stop_server(proc, children, timeout=10)
    assert out["sigterm"] and out["exit_code"] == -15 and not out.get("killed")
    assert out["children_left"] == 0 and out["clean"], out
    assert not any(server.process_alive(c) for c in children)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    time.sleep(1.0)
    out = server.stop_server(stubborn, [], timeout=1)
    assert out["killed"] and out["exit_code"] == -9 and not out["clean"]


def test_batch_counter_counts_unscheduled_and_moved_requests():
    """The persistent-batch counter that test_channel_k_lifetime.py uses as proof, on a
    stand-in runner whose _update_states drops, keeps and condenses rows as vLLM's does."""
    SchedulerOutput = collections.namedtuple("SchedulerOutput",
                                             "num_scheduled_tokens finished_req_ids")

    class Batch:
        def __init__(self) -> None:
            self.req_ids = ["a", "b", "c", "d"]

    class Runner:
        def __init__(self) -> None:
            self.input_batch = Batch()

        def _update_states(self, out):  # drop finished and unscheduled rows, then condense
            self.input_batch.req_ids = [r for r in self.input_batch.req_ids
                                        if r in out.num_scheduled_tokens]
            return None

    worker = collections.namedtuple("Worker", "model_runner")(Runner())
    assert engine_probes.install_batch_counter(worker)
    # step 1: "b" finished, "c" reached max_tokens under async scheduling and sits out
    worker.model_runner._update_states(SchedulerOutput({"a": 1, "d": 1}, {"b"}))
    got = engine_probes.fetch_batch_counter(worker)
    assert got == {"steps": 1, "unscheduled": 1, "moved": 1}  # "d" moved from 3 to 1
    # step 2: everything scheduled, nothing moves
    worker.model_runner._update_states(SchedulerOutput({"a": 1, "d": 1}, set()))
    assert engine_probes.fetch_batch_counter(worker) == {"steps": 2, "unscheduled": 1, "moved": 1}


def test_poison_prefill_workspaces_fills_each_shared_workspace_once():
    shared, own = torch.zeros(2, 3, 4), torch.zeros(5)

    class Layer(torch.nn.Module):
        def __init__(self, ws):
            super().__init__()
            self.impl = types.SimpleNamespace(prefill_workspace=ws)

    model = torch.nn.Sequential(Layer(shared), Layer(shared), Layer(None), Layer(own),
                                torch.nn.Linear(2, 2))
    assert engine_probes.poison_prefill_workspaces(model) == 2
    assert shared.isnan().all() and own.isnan().all()


@pytest.mark.parametrize(("level", "calls"), [
    (1, [("sleep", 1), ("wake_up", None)]),
    # level 2 discards the weights: wake their memory, reload them, then the KV cache
    (2, [("sleep", 2), ("wake_up", ["weights"]), ("rpc", "reload_weights"),
         ("wake_up", ["kv_cache"])]),
])
def test_sleep_and_wake_follows_the_level(monkeypatch, level, calls):
    seen = []

    class FakeLLM:
        def sleep(self, level):
            seen.append(("sleep", level))

        def wake_up(self, tags=None):
            seen.append(("wake_up", tags))

        def collective_rpc(self, method, args=()):
            seen.append(("rpc", method))

    free = iter([(1000, 0), (5000, 0)])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: next(free))
    assert engine_probes.sleep_and_wake(FakeLLM(), level) == 4000
    assert seen == calls


def test_fa3_baseline_runs_with_the_schedule_vllm_makes_once_a_step(monkeypatch):
    """The FA3 baseline as vLLM 0.20 decodes: the tile schedule made once (for a step) from
    the batch's shapes and the cache's dtype and page size, then passed to every call with
    the same split bound; without one, FA3 schedules each call itself."""
    import vllm.vllm_flash_attn as fa

    from vllm_bitdecode.testing import baselines

    calls: list[dict] = []
    monkeypatch.setattr(fa, "get_scheduler_metadata", lambda **kw: ("schedule", kw))
    monkeypatch.setattr(fa, "flash_attn_varlen_func", lambda *a, **kw: calls.append(kw))
    q = torch.zeros(3, 32, 128, dtype=torch.float8_e4m3fn)
    k = torch.zeros(40, 16, 8, 128, dtype=torch.float8_e4m3fn)
    lens = torch.tensor([100, 7, 640], dtype=torch.int32)
    cu_q = torch.arange(4, dtype=torch.int32)
    tag, kw = baselines.fa3_decode_schedule(q, k, lens, 640, cu_q)
    assert tag == "schedule" and kw["cache_seqlens"] is lens and kw["cu_seqlens_q"] is cu_q
    assert {key: kw[key] for key in ("batch_size", "max_seqlen_q", "max_seqlen_k",
                                     "num_heads_q", "num_heads_kv", "headdim", "page_size",
                                     "qkv_dtype", "causal", "num_splits")} == dict(
        batch_size=3, max_seqlen_q=1, max_seqlen_k=640, num_heads_q=32, num_heads_kv=8,
        headdim=128, page_size=16, qkv_dtype=torch.float8_e4m3fn, causal=True,
        num_splits=baselines.FA3_GRAPH_MAX_SPLITS)
    schedule = (tag, kw)
    baselines.fa3_paged_decode(q, k, k, None, lens, 640, 0.1, out=torch.empty(3, 32, 128),
                               cu_seqlens_q=cu_q, scheduler_metadata=schedule,
                               num_splits=baselines.FA3_GRAPH_MAX_SPLITS)
    baselines.fa3_paged_decode(q, k, k, None, lens, 640, 0.1, out=torch.empty(3, 32, 128),
                               cu_seqlens_q=cu_q)
    assert calls[0]["scheduler_metadata"] is schedule
    assert calls[0]["num_splits"] == baselines.FA3_GRAPH_MAX_SPLITS
    assert calls[1]["scheduler_metadata"] is None and calls[1]["num_splits"] == 0
