"""Test and benchmark support: dummy-weight Llama engines, no downloads anywhere.

The GPU tests and benchmarks build their engines from here; none of it is needed to
serve a model. By module:

- ``model_dir``: model directories for ``load_format="dummy"`` (config.json, and a tiny
  word-level tokenizer with a chat template for ``vllm serve`` / ``vllm bench``).
- ``engine``: one engine per spec, each in a fresh subprocess (:func:`engine.run_in_subprocess`
  runs ``python -m vllm_bitdecode.testing SPEC OUT``), so that engines with different
  backends never share GPU memory or plugin state, and the engine log (which carries
  vLLM's "GPU KV cache size" line) can be read back. A spec can ask one engine for several
  things in turn, so that one start-up (35-55 s with compilation) serves many checks.
- ``engine_probes``: what a spec installs into its engine: output captures, per-step
  counters on the metadata builder, the persistent batch's counter, every layer's output
  checked against the float32 reference on its own pages, KV-cache poisoning, sleep and
  wake-up.
- ``engine_timing``: ms per decode step in the steady state, and a ``vllm bench
  throughput``-style run.
- ``forced_decode``: a logits processor that teacher-forces a generation, so that a text
  is scored through the decode path (``benchmarks/quality_decode.py``).
- ``comparisons``: how two engines' tokens, log-probabilities and attention rows are
  compared.
- ``baselines``: vLLM's FlashAttention-3 paged decode, the kernels' unquantized baseline.
- ``server``: ``vllm serve`` started, polled and stopped; processes; Prometheus text.
- ``gpu_monitor``: NVML memory figures and a sampler of SM clock and power.

A model directory for ``vllm serve`` / ``vllm bench`` is written by::

    python -m vllm_bitdecode.testing make-model DIR [--layers N] [--vocab-size V]
"""
