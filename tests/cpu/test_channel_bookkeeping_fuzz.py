"""Randomized differential tests of per-channel K mode's host-side bookkeeping.

(a) Residual slots (``residual_slots``, docs/per-channel-k-design.md section 4): seeded
    random lives of requests (arrive, run in chunks, sit out steps, finish, get aborted
    and resubmitted under their id, get preempted by ``schedule()`` or all at once by
    ``reset_prefix_cache``, resume with a block-aligned prefix hit) go through a stand-in
    of vLLM 0.20's ``Scheduler`` that builds real ``SchedulerOutput`` objects, then
    through vLLM's real ``GPUModelRunner._update_states`` on a real ``InputBatch`` (remove,
    add, condense, ``reorder_batch_to_split_decodes_and_prefills``' swaps), wrapped by
    ``install_table`` as in a worker. After every step the table is checked against a
    model of who owns what, and the residual rows every batch row reads
    (``kc_prefill.gather_own_kv``) must be ones its request wrote in its current life.
(b) ``kc_prefill.plan_kc_prefill`` on random batches (block sizes 16..128, chunks that
    start and end mid-page, prefix hits, decode rows before the prefill rows): every
    query sees each position of its context once, its own page exact and the pages
    before it dequantized, every pool row it reads written, and the pool and the
    workspace sizes agree with ``pool_rows_per_request``, ``workspace_starts`` and
    ``workspace_rows``.
"""

from __future__ import annotations

import random
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vllm_bitdecode import kc_prefill, residual_slots

# ---------------------------------------------------------------------------------------
# (a) residual slots through vLLM's own _update_states
# ---------------------------------------------------------------------------------------


@dataclass
class _Req:
    """A request as the scheduler stand-in tracks it; ``life`` tells its lives apart."""

    req_id: str
    prompt: int
    max_out: int
    life: int = -1  # a fresh number at every admission and resumption
    computed: int = 0
    out: int = 0
    preempted: bool = False  # waiting after a preemption: resumes as a cached request

    @property
    def tokens(self) -> int:
        return self.prompt + self.out


class _Scheduler:
    """vLLM 0.20's ``Scheduler.schedule`` reduced to what reaches the worker: running
    requests first (some sit a step out, as PP or the budget makes them; allocation
    failures preempt the last running request, or any one under priority scheduling,
    possibly one scheduled earlier in the step), then waiting ones only if nothing was
    preempted, new or resumed from a block-aligned prefix hit, ``running`` capped at
    ``max_seqs``. ``finished_req_ids`` names the requests stopped or aborted since the
    last output; ``preempted_req_ids`` also names those ``reset_prefix_cache`` preempted
    (what ``_registration``'s step 8 adds)."""

    def __init__(self, rng: random.Random, max_seqs: int, bs: int, budget: int,
                 max_model_len: int, priority: bool) -> None:
        self.rng, self.max_seqs, self.bs, self.budget = rng, max_seqs, bs, budget
        self.max_model_len, self.priority = max_model_len, priority
        self.running: list[_Req] = []
        self.waiting: list[_Req] = []
        self.finished: set[str] = set()
        self.forced: set[str] = set()
        self.ids = 0
        self.lives = 0

    def arrive(self, req_id: str | None = None) -> None:
        if req_id is None:
            req_id, self.ids = f"r{self.ids}", self.ids + 1
        prompt = self.rng.randint(1, self.max_model_len // 2)
        max_out = self.rng.randint(1, self.max_model_len - 1 - prompt)
        self.waiting.append(_Req(req_id, prompt, max_out))

    def _preempt(self, req: _Req) -> None:
        req.computed, req.preempted = 0, True
        self.waiting.insert(0, req)

    def between_steps(self) -> None:
        rng = self.rng
        reset_first = rng.random() < 0.5  # a reset may come before or after an abort
        if reset_first:
            self._maybe_reset()
        for req in [*self.running, *self.waiting]:
            if rng.random() < 0.02:  # abort; sometimes resubmitted under the same id
                (self.running if req in self.running else self.waiting).remove(req)
                self.finished.add(req.req_id)
                if rng.random() < 0.5:
                    self.arrive(req.req_id)
        if not reset_first:
            self._maybe_reset()
        while len(self.waiting) < 2 * self.max_seqs and rng.random() < 0.4:
            self.arrive()

    def _maybe_reset(self) -> None:
        """reset_prefix_cache(reset_running_requests=True): every running request
        preempted outside schedule(), named in the next output (_registration step 8)."""
        if self.running and self.rng.random() < 0.03:
            while self.running:
                req = self.running.pop()
                self._preempt(req)
                self.forced.add(req.req_id)

    def schedule(self) -> tuple[object, dict[str, tuple[_Req, int, int]]]:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.core.sched.output import (
            CachedRequestData,
            NewRequestData,
            SchedulerOutput,
        )

        rng, budget = self.rng, self.budget
        threshold = rng.choice([0, 0, self.bs - 1, 3 * self.bs + 5])  # long_prefill_...
        sched: dict[str, tuple[_Req, int, int]] = {}  # id -> (request, start, tokens)
        running: list[_Req] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if rng.random() < 0.15:  # sits this step out, still running
                i += 1
                continue
            n = req.tokens - req.computed
            if 0 < threshold < n:
                n = threshold
            n = min(n, budget)
            fits = True
            while rng.random() < 0.04:  # allocate_slots failed: preempt until it fits
                if self.priority:
                    victim = rng.choice(self.running)
                    self.running.remove(victim)
                    if victim.req_id in sched:
                        budget += sched.pop(victim.req_id)[2]
                        running.remove(victim)
                        i -= 1
                else:
                    victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.req_id)
                if victim is req:
                    fits = False
                    break
            if not fits:
                break
            sched[req.req_id] = (req, req.computed, n)
            running.append(req)
            budget -= n
            i += 1
        new: list[_Req] = []
        resumed: list[_Req] = []
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.max_seqs and rng.random() < 0.9):
            req = self.waiting.pop(0)
            # a prefix hit is whole blocks, capped at tokens - 1 (get_computed_blocks)
            hit = rng.randint(0, (req.tokens - 1) // self.bs) * self.bs \
                if rng.random() < 0.5 else 0
            n = req.tokens - hit
            if 0 < threshold < n:
                n = threshold
            n = min(n, budget)
            req.computed, req.life, self.lives = hit, self.lives, self.lives + 1
            (resumed if req.preempted else new).append(req)
            req.preempted = False
            self.running.append(req)
            sched[req.req_id] = (req, hit, n)
            budget -= n
        params = SamplingParams()
        cached = running + resumed
        out = SchedulerOutput(
            scheduled_new_reqs=[NewRequestData(
                req_id=r.req_id, prompt_token_ids=list(range(r.prompt)), mm_features=[],
                sampling_params=params, pooling_params=None, block_ids=([],),
                num_computed_tokens=r.computed, lora_request=None) for r in new],
            scheduled_cached_reqs=CachedRequestData(
                req_ids=[r.req_id for r in cached],
                resumed_req_ids={r.req_id for r in resumed},
                new_token_ids=[], all_token_ids={},
                new_block_ids=[None] * len(running) + [([],)] * len(resumed),
                num_computed_tokens=[r.computed for r in cached],
                num_output_tokens=[r.out for r in cached]),
            num_scheduled_tokens={k: v[2] for k, v in sched.items()},
            total_num_scheduled_tokens=sum(v[2] for v in sched.values()),
            scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
            num_common_prefix_blocks=[0], finished_req_ids=self.finished,
            free_encoder_mm_hashes=[], preempted_req_ids=set(preempted) | self.forced)
        self.finished, self.forced = set(), set()
        return out, sched

    def after_step(self, sched: dict[str, tuple[_Req, int, int]]) -> None:
        """Tokens computed; a request whose tokens are all computed samples one, and
        stops at its max_out (reported finished in the next output)."""
        for req, start, n in sched.values():
            req.computed = start + n
            if req.computed == req.tokens:
                req.out += 1
                if req.out >= req.max_out:
                    self.running.remove(req)
                    self.finished.add(req.req_id)


def _runner_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """vLLM's GPUModelRunner with only the state its ``_update_states`` reads (one PP
    rank, no spec decode, no mrope, not pooling, sync scheduling)."""
    from vllm.v1.worker import gpu_model_runner as gmr
    from vllm.v1.worker.gpu.pool.late_interaction_runner import LateInteractionRunner
    from vllm.v1.worker.gpu_input_batch import InputBatch

    monkeypatch.setattr(gmr, "get_pp_group", lambda: types.SimpleNamespace(is_last_rank=True))

    class Runner(gmr.GPUModelRunner):
        def __init__(self, vllm_config: object, max_seqs: int, max_model_len: int,
                     budget: int, bs: int, threshold: int) -> None:  # no super(): no GPU
            self.vllm_config = vllm_config
            self.device = torch.device("cpu")
            self.requests = {}
            self.num_prompt_logprobs = {}
            self.encoder_cache = {}
            self.late_interaction_runner = LateInteractionRunner()
            self.speculative_config = None
            self.is_pooling_model = False
            self.uses_mrope = False
            self.uses_xdrope_dim = 0
            self.use_async_scheduling = False
            self.use_async_spec_decode = False
            self.kv_cache_config = types.SimpleNamespace(kv_cache_groups=[None])
            self.reorder_batch_threshold = threshold
            self.input_batch = InputBatch(
                max_num_reqs=max_seqs, max_model_len=max_model_len,
                max_num_batched_tokens=budget, device=self.device, pin_memory=False,
                vocab_size=32, block_sizes=[bs], kernel_block_sizes=[bs])

    return Runner


class _Config:
    """The engine's VllmConfig, which the table is keyed by (weakly)."""


def _code(life: int, pos: int) -> float:
    return float(life * 4096 + pos)  # positions stay below max_model_len <= 4096


# (max_seqs, block size, token budget, reorder threshold, priority): budgets that cut
# chunks mid-page, one slot only, a threshold above the plugin's 1
CONFIGS = [(4, 16, 37, 1, False), (1, 16, 20, 1, False), (3, 32, 45, 1, True),
           (8, 16, 64, 4, True), (6, 64, 150, 1, False), (2, 128, 300, 1, True)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_seqs,bs,budget,threshold,priority", CONFIGS)
def test_random_lives_keep_slots_private_through_vllms_update_states(
        monkeypatch, seed, max_seqs, bs, budget, threshold, priority):
    monkeypatch.setattr(residual_slots, "_tables", {})
    rng = random.Random(1000 * seed + max_seqs * bs)
    max_model_len = 6 * bs + 3
    owner = _Config()
    runner_cls = _runner_class(monkeypatch)
    table = residual_slots.install_table(max_seqs, "cpu", owner, runner_cls=runner_cls)
    runner = runner_cls(owner, max_seqs, max_model_len, budget, bs, threshold)
    sched = _Scheduler(rng, max_seqs, bs, budget, max_model_len, priority)
    scratch = max_seqs
    # residual rows hold a code of the life and position that wrote them; NaN: never
    residual = torch.full((max_seqs + 1, 2, 1, bs, 1), float("nan"), dtype=torch.float64)
    owned: dict[str, int] = {}  # the model: request -> slot, for the requests that hold one
    seen: set[str] = set()
    stats = dict.fromkeys(("steps", "rows", "moved", "reused", "preempted", "forced",
                           "back_at_once"), 0)
    last_rows: list[str] = []
    for _ in range(400):
        sched.between_steps()
        stats["forced"] += bool(sched.forced)
        out, step = sched.schedule()
        runner._update_states(out)  # vLLM's, then the table's step (install_table)
        gone = out.finished_req_ids | out.preempted_req_ids
        # named gone and scheduled in one output: resubmitted, or resumed after a reset
        stats["back_at_once"] += len(gone & set(step))
        stats["preempted"] += len(out.preempted_req_ids)
        freed = {owned.pop(r) for r in gone if r in owned}
        rows = list(runner.input_batch.req_ids)
        stats["moved"] += sum(r in rows and rows.index(r) != i and r not in gone
                              for i, r in enumerate(last_rows))  # condense, swap_states
        last_rows = rows
        assert sorted(rows) == sorted(step), "the batch is not the step's requests"
        host = table.host.tolist()
        for i, r in enumerate(rows):
            if r in owned:  # kept its slot across steps sat out and row moves
                assert host[i] == owned[r], f"{r} moved from slot {owned[r]} to {host[i]}"
            else:  # a new life takes a slot no live request holds
                assert 0 <= host[i] < scratch and host[i] not in owned.values(), (r, host)
                stats["reused"] += host[i] in freed
                owned[r] = host[i]
        seen.update(rows)
        assert host[len(rows):] == [scratch] * (max_seqs - len(rows)), host
        assert torch.equal(table.device_row_slot, table.host)
        assert len(set(owned.values())) == len(owned), f"two requests share a slot: {owned}"
        assert table.slots.live == len(owned) <= max_seqs
        for r in seen:  # holders keep theirs; finished and preempted ones hold none
            assert table.slots.slot_of(r) == owned.get(r), r
        assert sorted(table.slots._free + list(owned.values())) == list(range(max_seqs))
        if rows:  # what the kernels read and write, through the real plan and gather
            _read_and_write_residual(residual, rows, host, step, bs)
            stats["rows"] += len(rows)
        sched.after_step(step)
        stats["steps"] += 1
    # drain: everything aborted; every slot comes back and all of them can be given again
    for req in [*sched.running, *sched.waiting]:
        sched.finished.add(req.req_id)
    sched.running, sched.waiting = [], []
    out, _ = sched.schedule()
    runner._update_states(out)
    assert table.slots.live == 0 and table.host.tolist() == [scratch] * max_seqs
    fresh = [f"z{i}" for i in range(max_seqs)]
    assert sorted(table.step([], [], fresh)) == list(range(max_seqs))
    assert stats["preempted"] and stats["reused"] and 2 * stats["rows"] > stats["steps"], stats
    assert stats["moved"] or max_seqs == 1, stats


def _read_and_write_residual(residual: torch.Tensor, rows: list[str], row_slot: list[int],
                             step: dict[str, tuple[_Req, int, int]], bs: int) -> None:
    """The design's invariant (section 4): every residual row a kernel reads was written by
    the slot's current owner in its current life. Reads as ``gather_own_kv`` does (own
    page's rows before the step's first position), writes as phase B does (the step's
    tokens in the last page written)."""
    qsl, lens, keys = [0], [], []
    for r in rows:
        req, start, n = step[r]
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
        keys += [_code(req.life, p) for p in range(start, start + n)]
    key = torch.tensor(keys, dtype=torch.float64).view(-1, 1, 1)
    plan = kc_prefill.plan_kc_prefill(qsl, lens, list(range(len(rows))), bs)
    own = kc_prefill.gather_own_kv(plan, residual, row_slot, key, -key)
    for i, r in enumerate(rows):
        req, start, n = step[r]
        first = start // bs * bs
        want = torch.tensor([_code(req.life, p) for p in range(first, start + n)],
                            dtype=torch.float64)
        got = own[i][:, :, 0, 0]
        assert torch.equal(got[0], want) and torch.equal(got[1], -want), (
            f"{r} (life {req.life}, slot {row_slot[i]}) read residual rows it did not "
            f"write: {got[0].tolist()} instead of {want.tolist()}")
        for p in range(max(start, (start + n - 1) // bs * bs), start + n):
            residual[row_slot[i], 0, 0, p % bs, 0] = _code(req.life, p)
            residual[row_slot[i], 1, 0, p % bs, 0] = -_code(req.life, p)


# ---------------------------------------------------------------------------------------
# (b) plan_kc_prefill on random batches
# ---------------------------------------------------------------------------------------

_WS, _EXACT, _PAD = 1, 2, 3  # what a pool row holds: dequantized, exact, zeroed padding


def _random_batch(rng: random.Random, bs: int, max_model_len: int, max_batched: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """(query_start_loc, seq_lens, prefill rows): decode rows first, then prefill rows
    whose chunks start at 0, after a prefix hit or anywhere, within the token budget."""
    lens, qlens = [], []
    budget = max_batched
    for _ in range(rng.randint(0, 3)):  # decodes
        if budget < 2:
            break
        lens.append(rng.randint(1, max_model_len))
        qlens.append(1)
        budget -= 1
    num_decodes = len(lens)
    for _ in range(rng.randint(1, 5)):
        if budget < 1:
            break
        n = rng.randint(1, max_model_len)
        kind = rng.random()
        if kind < 0.3:
            start = 0
        elif kind < 0.6:
            start = rng.randint(0, (n - 1) // bs) * bs  # a prefix hit, or a resumption
        else:
            start = rng.randint(0, n - 1)  # an earlier chunk ended anywhere
        start = max(start, n - budget)
        lens.append(n)
        qlens.append(n - start)
        budget -= n - start
    qsl = [0, *np.cumsum(qlens).tolist()]
    return qsl, lens, list(range(num_decodes, len(lens)))


def _check_plan(qsl: list[int], lens: list[int], rows: list[int], bs: int,
                group_pages: int | None, plan: kc_prefill.KCPrefillPlan) -> None:
    gp = group_pages or max(1, 128 // bs)
    starts = [lens[r] - (qsl[r + 1] - qsl[r]) for r in rows]
    ns = [lens[r] for r in rows]
    # every prefill token as (request, position), in token order
    spans = list(zip(starts, ns, strict=True))
    tok_req = np.concatenate([np.full(n - s, i) for i, (s, n) in enumerate(spans)])
    tok_pos = np.concatenate([np.arange(s, n) for s, n in spans])
    assert plan.starts == starts and plan.seq_lens == ns and plan.rows == rows
    ws_blocks = [-(-n // bs) for n in ns]
    assert plan.ws_block_start == np.cumsum([0, *ws_blocks[:-1]]).tolist()
    assert plan.ws_blocks == sum(ws_blocks) and plan.ws_rows == plan.ws_blocks * bs
    assert kc_prefill.workspace_starts(plan).tolist() == [
        b * bs for b in plan.ws_block_start] + [plan.ws_rows]
    # segments: the queries of one request in one page, in token order, none empty
    cu = plan.cu_seqlens_q.tolist()
    assert cu[0] == 0 and cu[-1] == len(tok_pos) and (np.diff(cu) > 0).all()
    seg_pages = []
    for k in range(plan.num_segments):
        reqs, pages = tok_req[cu[k]:cu[k + 1]], tok_pos[cu[k]:cu[k + 1]] // bs
        assert (reqs == reqs[0]).all() and (pages == pages[0]).all(), f"segment {k} mixes"
        seg_pages.append((int(reqs[0]), int(pages[0])))
    touched = [(n - 1) // bs - s // bs + 1 for s, n in spans]
    assert len(seg_pages) == len(set(seg_pages)) == sum(touched)  # one per page touched
    per_request = kc_prefill.pool_rows_per_request(qsl, lens, rows, bs)
    assert per_request == [(w + t) * bs for w, t in zip(ws_blocks, touched, strict=True)]
    assert sum(per_request) == plan.pool_rows == (plan.ws_blocks + plan.num_segments) * bs
    # what every pool row holds: the workspace (dequantize_pages_kc from workspace_starts),
    # gather_own_kv's rows at scratch_rows, zeros at scratch_pad_rows; 0: nothing written
    kind = np.zeros(plan.pool_rows, dtype=np.int64)
    req_of = np.full(plan.pool_rows, -1)
    pos_of = np.full(plan.pool_rows, -1)
    for i, n in enumerate(ns):
        w = plan.ws_block_start[i] * bs + np.arange(n)
        assert (kind[w] == 0).all(), "workspace regions overlap"
        kind[w], req_of[w], pos_of[w] = _WS, i, np.arange(n)
    own_req = np.concatenate([np.full(n - s // bs * bs, i) for i, (s, n) in enumerate(spans)])
    own_pos = np.concatenate([np.arange(s // bs * bs, n) for s, n in spans])
    assert plan.own_total == len(own_pos)
    sr = plan.scratch_rows.numpy()
    assert len(sr) == len(own_pos) and len(set(sr.tolist())) == len(sr)
    assert (sr >= plan.ws_rows).all() and (sr < plan.pool_rows).all()
    kind[sr], req_of[sr], pos_of[sr] = _EXACT, own_req, own_pos
    pad = plan.scratch_pad_rows.numpy()
    assert len(set(pad.tolist())) == len(pad) and (kind[pad] == 0).all()
    kind[pad] = _PAD
    assert (kind[plan.ws_rows:] != 0).all(), "a scratch row is never written"
    # groups: up to gp consecutive pages of one request; closed keys: its pages before g0
    ccu = plan.cu_seqlens_closed_q.tolist()
    assert ccu[0] == 0 and ccu[-1] == cu[-1] and set(ccu) <= set(cu)
    closed = plan.closed_len.tolist()
    table, near_table = plan.block_table.numpy(), plan.near_table.numpy()
    near_len = plan.near_len.tolist()
    empty = plan.prefix_empty.tolist()
    q_counts, group_q = [], []
    for g in range(plan.num_groups):
        segs = [k for k in range(plan.num_segments) if ccu[g] <= cu[k] < ccu[g + 1]]
        i, g0 = seg_pages[segs[0]]
        assert [seg_pages[k] for k in segs] == [(i, g0 + j) for j in range(len(segs))]
        assert len(segs) <= gp and closed[g] == g0 * bs
        assert empty[ccu[g]:ccu[g + 1]] == [g0 == 0] * (ccu[g + 1] - ccu[g])
        group_q.append(ccu[g + 1] - ccu[g])
        c_rows = (table[g, :g0, None] * bs + np.arange(bs)).ravel()
        assert (kind[c_rows] == _WS).all() and (req_of[c_rows] == i).all()
        assert sorted(pos_of[c_rows].tolist()) == list(range(g0 * bs))
        for k in segs:
            # near keys, bottom-right causal: the segment's queries q_lo .. q_hi - 1 see
            # near keys up to their own position, which holds for every query iff the near
            # keys are positions g0 * bs .. q_hi - 1 in order (the closed ones are 0 ..
            # g0 * bs - 1); pages are read whole, so every row of them must be written
            page = seg_pages[k][1]
            q_lo, q_hi = int(tok_pos[cu[k]]), int(tok_pos[cu[k + 1] - 1]) + 1
            q_counts.append(q_hi - q_lo)
            pages = near_table[k, : -(-near_len[k] // bs)]
            assert (pages < plan.ws_blocks + plan.num_segments).all()
            loaded = (pages[:, None] * bs + np.arange(bs)).ravel()
            assert (kind[loaded] != 0).all(), f"segment {k} reads rows nobody wrote"
            keys = loaded[: near_len[k]]
            assert (req_of[keys] == i).all(), f"segment {k} reads another request's keys"
            assert pos_of[keys].tolist() == list(range(g0 * bs, q_hi)), f"segment {k}"
            own_page = pos_of[keys] >= page * bs  # the own page exact, the others not
            assert (kind[keys] == np.where(own_page, _EXACT, _WS)).all(), f"segment {k}"
            assert (kind[loaded[near_len[k]:]] == _PAD).all()  # past the last position
    assert (table < plan.ws_blocks + plan.num_segments).all()  # padding: in the pool
    assert (plan.max_q, plan.max_near) == (max(q_counts), max(near_len))
    assert (plan.max_closed, plan.max_closed_q) == (max(closed), max(group_q))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_random_prefill_plans_cover_every_context_once(seed, bs):
    from vllm_bitdecode.backend.metadata import group_prefills

    rng = random.Random(seed * 131 + bs)
    for _ in range(40):
        max_model_len = rng.randint(1, 12) * bs + rng.randint(0, bs - 1)
        max_batched = rng.randint(1, 3 * max_model_len)
        qsl, lens, rows = _random_batch(rng, bs, max_model_len, max_batched)
        group_pages = rng.choice([None, 1, 2, 3])
        _check_plan(qsl, lens, rows, bs, group_pages,
                    kc_prefill.plan_kc_prefill(qsl, lens, rows, bs, group_pages))
        # the builder's cut: every request fits the engine's workspace, and so does each
        # group of them (metadata._build_channel_k)
        capacity = kc_prefill.workspace_rows(max_model_len, max_batched, bs)
        need = kc_prefill.pool_rows_per_request(qsl, lens, rows, bs)
        assert max(need) <= capacity, (qsl, lens, rows, max_model_len, max_batched)
        for b, e in group_prefills(need, capacity):
            plan = kc_prefill.plan_kc_prefill(qsl, lens, rows[b:e], bs)
            assert plan.pool_rows <= capacity
            _check_plan(qsl, lens, rows[b:e], bs, None, plan)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_workspace_rows_hold_every_request(bs):
    """Every request vLLM can schedule (context n <= max_model_len, chunk q <= n and <=
    max_num_batched_tokens, starting anywhere) fits ``workspace_rows``: all (n, q) pairs,
    as one batch through ``pool_rows_per_request``."""
    rng = random.Random(bs)
    for _ in range(8):
        max_model_len = rng.randint(1, 8) * bs + rng.randint(0, bs - 1)
        max_batched = rng.randint(1, 2 * max_model_len)
        n, q = np.meshgrid(np.arange(1, max_model_len + 1), np.arange(1, max_batched + 1))
        keep = q <= n
        n, q = n[keep], q[keep]
        qsl = np.concatenate(([0], np.cumsum(q)))
        need = kc_prefill.pool_rows_per_request(qsl, n, range(len(n)), bs)
        capacity = kc_prefill.workspace_rows(max_model_len, max_batched, bs)
        worst = int(np.argmax(need))
        assert need[worst] <= capacity, (max_model_len, max_batched, n[worst], q[worst])
