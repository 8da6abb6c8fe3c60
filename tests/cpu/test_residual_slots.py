"""ResidualSlots: the per-request residual slots of channel mode (issue #7, design section 4)."""

from __future__ import annotations

import random

import pytest

from vllm_bitdecode.residual_slots import ResidualSlots


def test_new_requests_get_distinct_slots_and_empty_rows_the_scratch_slot():
    s = ResidualSlots(4)
    assert s.update([], [], ["a", "b", None, "c"]) == [0, 1, 4, 2]
    assert (s.slot_of("a"), s.slot_of("b"), s.slot_of("c"), s.live) == (0, 1, 2, 3)


def test_a_request_keeps_its_slot_while_unscheduled_and_across_row_moves():
    s = ResidualSlots(4)
    s.update([], [], ["a", "b", "c"])
    assert s.update([], [], ["c", None, "a"]) == [2, 4, 0]  # b not scheduled, rows moved
    assert s.update([], [], ["b", "a", "c"]) == [1, 0, 2]  # b is back with its slot


def test_finished_and_preempted_slots_are_reused():
    s = ResidualSlots(2)
    s.update([], [], ["a", "b"])
    with pytest.raises(RuntimeError, match="no free residual slot for request 'c'"):
        s.update([], [], ["a", "b", "c"])
    s = ResidualSlots(2)
    s.update([], [], ["a", "b"])
    assert s.update(["a"], ["b"], ["c", "d"]) == [0, 1]
    assert s.slot_of("a") is None and s.slot_of("b") is None
    # the preempted request resumes later under its id and gets a slot again
    assert s.update(["c"], [], ["d", "b"]) == [1, 0]


def test_unknown_ids_are_ignored_and_duplicate_rows_refused():
    s = ResidualSlots(3)
    assert s.update(["never-seen"], ["nor-this"], ["a"]) == [0]
    with pytest.raises(RuntimeError, match="more than one batch row"):
        s.update([], [], ["a", "a"])
    with pytest.raises(ValueError):
        ResidualSlots(0)


def test_random_schedules_keep_slots_private_and_stable():
    """vLLM-like steps: admit, finish, preempt, resume, leave requests out of a step and
    shuffle rows. A live request's slot never changes; no two live requests share one."""
    rng = random.Random(0)
    max_seqs = 8
    s = ResidualSlots(max_seqs)
    live: dict[str, int] = {}  # request -> slot it was given
    waiting = [f"r{i}" for i in range(200)]
    preempted: list[str] = []
    for _ in range(2000):
        finished = [r for r in live if rng.random() < 0.05]
        pre = [r for r in live if r not in finished and rng.random() < 0.03]
        for r in finished + pre:
            del live[r]
        preempted += pre
        # running requests may be left out of a step; an admitted one is scheduled at once
        scheduled = [r for r in live if rng.random() < 0.8]
        while len(live) + len(scheduled) - len([r for r in scheduled if r in live]) < max_seqs \
                and (waiting or preempted) and rng.random() < 0.7:
            scheduled.append(preempted.pop(0) if preempted and (rng.random() < 0.5 or not waiting)
                             else waiting.pop(0))
        rows: list[str | None] = scheduled + [None] * rng.randint(0, 2)
        rng.shuffle(rows)
        row_slot = s.update(finished, pre, rows)
        for r, slot in zip(rows, row_slot, strict=True):
            if r is None:
                assert slot == max_seqs
            elif r in live:
                assert slot == live[r], f"{r} moved from slot {live[r]} to {slot}"
            else:
                live[r] = slot
        assert len(live) <= max_seqs and s.live == len(live)
        assert len(set(live.values())) == len(live), "two live requests share a slot"


def test_wrapped_update_states_writes_row_slot_after_vllms_own_update():
    """A stand-in for vLLM's GPUModelRunner: its _update_states rewrites the batch's
    rows (finished out, unscheduled out, new in, reordered); the wrapper must read the
    rows it left and fill the device row_slot, scratch slot past the batch."""
    import types

    import torch

    from vllm_bitdecode.residual_slots import RowSlotTable, wrap_update_states

    runner = types.SimpleNamespace(input_batch=types.SimpleNamespace(req_ids=[]))
    plans = iter([["a", "b", "c"], ["c", "a"], ["d", "a", "c"]])

    def update_states(scheduler_output):
        runner.input_batch.req_ids = next(plans)
        return "deferred"

    runner._update_states = update_states
    table = RowSlotTable(4, "cpu")
    wrap_update_states(runner, table)
    out = types.SimpleNamespace
    assert runner._update_states(out(finished_req_ids=set(), preempted_req_ids=None)) == "deferred"
    assert table.device_row_slot.tolist() == [0, 1, 2, 4]
    runner._update_states(out(finished_req_ids=set(), preempted_req_ids={"b"}))
    assert table.device_row_slot.tolist() == [2, 0, 4, 4]
    runner._update_states(out(finished_req_ids=set(), preempted_req_ids=set()))
    assert table.device_row_slot.tolist() == [1, 0, 2, 4]  # d takes b's freed slot
    assert table.device_row_slot.dtype == torch.int32


def test_installed_table_steps_every_runner_of_the_class_once(monkeypatch):
    """install_table patches the runner class (vLLM's GPUModelRunner in a worker) once,
    however often the builders of the layers' KV-cache groups call it; a runner steps the
    table of its own engine (its vllm_config), and a runner of an engine without one
    steps none."""
    import gc
    import types

    from vllm_bitdecode import residual_slots

    monkeypatch.setattr(residual_slots, "_tables", {})

    class Config:  # the VllmConfig object a runner and its builders share
        pass

    class Runner:
        def __init__(self, config):
            self.vllm_config = config
            self.input_batch = types.SimpleNamespace(req_ids=[])
            self.plans = iter([["a", "b"], ["b", "c"]])
            self.calls = 0

        def _update_states(self, scheduler_output):
            self.calls += 1
            self.input_batch.req_ids = next(self.plans)

    first, second, plain = Config(), Config(), Config()
    table = residual_slots.install_table(3, "cpu", first, runner_cls=Runner)
    assert residual_slots.install_table(3, "cpu", first, runner_cls=Runner) is table
    assert residual_slots.table_of(first) is table and residual_slots.table_of(plain) is None
    with pytest.raises(RuntimeError, match="builders disagree"):
        residual_slots.install_table(5, "cpu", first, runner_cls=Runner)
    other = residual_slots.install_table(2, "cpu", second, runner_cls=Runner)
    assert other is not table
    out = types.SimpleNamespace
    runner, runner2, runner3 = Runner(first), Runner(second), Runner(plain)
    runner._update_states(out(finished_req_ids=set(), preempted_req_ids=None))
    assert table.device_row_slot.tolist() == [0, 1, 3]
    runner._update_states(out(finished_req_ids={"a"}, preempted_req_ids=None))
    assert table.device_row_slot.tolist() == [1, 0, 3] and runner.calls == 2
    runner2._update_states(out(finished_req_ids=set(), preempted_req_ids=None))
    assert other.device_row_slot.tolist() == [0, 1]
    assert table.device_row_slot.tolist() == [1, 0, 3]  # the other engine's step left it
    runner3._update_states(out(finished_req_ids=set(), preempted_req_ids=None))
    assert runner3.calls == 1  # stepped no table, raised nothing
    del runner2, other, second
    gc.collect()
    assert len(residual_slots._tables) == 1  # the table went with its engine's config


def test_a_table_made_under_inference_mode_is_written_outside_it():
    """vLLM's CUDA-graph memory profile makes the engine's first builder under inference
    mode; the builders made after it share the table and reset it outside (H200,
    2026-12-05: every channel-K engine failed at start-up with "Inplace update to
    inference tensor outside InferenceMode")."""
    import torch

    from vllm_bitdecode.residual_slots import RowSlotTable

    with torch.inference_mode():
        table = RowSlotTable(4, "cpu")
    table.device_row_slot.fill_(table.slots.scratch)
    assert table.step([], [], ["a", None]) == [0, table.slots.scratch]
    assert table.device_row_slot.tolist()[:2] == [0, table.slots.scratch]
