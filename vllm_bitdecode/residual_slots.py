"""Residual slots of the per-channel K mode (issue #7), keyed by request id.

In channel mode the newest page of every live request keeps its exact K rows in a
residual buffer outside the pages (docs/per-channel-k-design.md, section 4). A slot of
that buffer belongs to a *request*, not to a batch row and not to a block: vLLM removes
unscheduled requests from the persistent batch, adds them back at other rows and swaps
rows to put decodes first, and the backend never learns when a block is freed. The
worker therefore keeps this table, updated once per step after vLLM's
``GPUModelRunner._update_states`` has fixed the step's rows:

1. free the slots of the finished and the preempted requests (a preempted request
   recomputes from a block-aligned position, so its next incarnation needs no old rows);
2. give a free slot to every request in the batch that has none (new, resumed, or
   resubmitted under a finished id);
3. map every batch row to its request's slot, and rows without a request to the scratch
   slot (``num_slots``), which kernels may read but no request owns.

Nothing is cleaned when a slot changes owner: every residual row a kernel reads was
written by the slot's current owner in its current incarnation (the design's invariant).
At most ``max_num_seqs`` requests run, so ``num_slots = max_num_seqs`` suffices as long
as every request that stops running is reported finished or preempted; more live
requests than slots raises. Two ways around that report are known in vLLM 0.20: a
streaming-input session (``AsyncLLM.generate`` with an input stream) waiting for its next
chunk would keep its slot, as it must (its newest page's rows are still needed), without
running, so idle sessions could take every slot: channel mode refuses such requests
(``config.check_streaming_input``); and requests preempted by
``reset_prefix_cache(reset_running_requests=True)`` (pausing with ``mode="keep"``), which
vLLM's next output does not name as preempted, so they kept their slots until they
resumed, which under priority scheduling may come after new requests: a channel-mode
engine's scheduler now names them (``_registration``, step 8).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from vllm_bitdecode._registration import wrap_once


class ResidualSlots:
    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        self.num_slots = num_slots
        self.scratch = num_slots  # the extra slot of rows that belong to no request
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest
        self._owner: dict[str, int] = {}

    def slot_of(self, req_id: str) -> int | None:
        return self._owner.get(req_id)

    @property
    def live(self) -> int:
        return len(self._owner)

    def update(self, finished: Iterable[str], preempted: Iterable[str],
               rows: Sequence[str | None]) -> list[int]:
        """One step: returns ``row_slot``, the slot of every batch row (``rows`` holds
        the request id of each row, None for an empty row)."""
        ids = [r for r in rows if r is not None]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"a request id appears in more than one batch row: {rows}")
        for req_id in (*finished, *preempted):
            slot = self._owner.pop(req_id, None)
            if slot is not None:
                self._free.append(slot)
        self._free.sort(reverse=True)
        out = []
        for req_id in rows:
            if req_id is None:
                out.append(self.scratch)
                continue
            slot = self._owner.get(req_id)
            if slot is None:
                if not self._free:
                    raise RuntimeError(
                        f"no free residual slot for request {req_id!r}: {self.live} live "
                        f"requests hold all {self.num_slots} (more running requests than "
                        "max_num_seqs?)")
                slot = self._owner[req_id] = self._free.pop()
            out.append(slot)
        return out


class RowSlotTable:
    """``ResidualSlots`` plus the step's ``row_slot`` tensor for the kernels: written into
    a host buffer (pinned where CUDA is present) and copied without blocking into a
    device tensor of fixed address, which CUDA graphs capture like the block table. Rows
    past the batch point to the scratch slot."""

    def __init__(self, max_num_seqs: int, device: torch.device | str) -> None:
        self.slots = ResidualSlots(max_num_seqs)
        pin = torch.cuda.is_available() and torch.device(device).type == "cuda"
        # normal tensors even when made under inference mode (vLLM's CUDA-graph memory
        # profile makes the first builder there): later builders of the engine share
        # the table and write it outside inference mode, which an inference tensor
        # refuses
        with torch.inference_mode(False):
            self.host = torch.full((max_num_seqs,), self.slots.scratch, dtype=torch.int32,
                                   pin_memory=pin)
            self.device_row_slot = torch.full((max_num_seqs,), self.slots.scratch,
                                              dtype=torch.int32, device=device)

    def step(self, finished: Iterable[str], preempted: Iterable[str] | None,
             rows: Sequence[str | None]) -> list[int]:
        row_slot = self.slots.update(finished, preempted or (), rows)
        self.host.fill_(self.slots.scratch)
        self.host[: len(row_slot)] = torch.tensor(row_slot, dtype=torch.int32)
        self.device_row_slot.copy_(self.host, non_blocking=True)
        return row_slot


def _step_after_update(runner: Any, scheduler_output: Any, table: RowSlotTable) -> None:
    table.step(scheduler_output.finished_req_ids,
               getattr(scheduler_output, "preempted_req_ids", None),
               list(runner.input_batch.req_ids))


def wrap_update_states(runner: Any, table: RowSlotTable) -> None:
    """Make ``runner._update_states`` (vLLM's ``GPUModelRunner``) update ``table`` once the
    step's rows are final: after the original has removed finished and unscheduled
    requests, added new and resumed ones and reordered the batch. It runs inside vLLM's
    ``synchronize_input_prep``, so the host buffer is not rewritten while the previous
    step's copy is pending."""
    original = runner._update_states

    def _update_states(scheduler_output: Any) -> Any:
        result = original(scheduler_output)
        _step_after_update(runner, scheduler_output, table)
        return result

    runner._update_states = _update_states


# One table per engine, keyed by its VllmConfig (the object the model runner and its
# metadata builders share): a process may hold more than one engine (vLLM's in-process
# engine core), and a runner of an engine without channel mode must not step any table.
_tables: dict[int, tuple[weakref.ref, RowSlotTable]] = {}


def table_of(owner: Any) -> RowSlotTable | None:
    """The row-slot table of the engine whose config is ``owner``, if it has one."""
    entry = _tables.get(id(owner))
    return entry[1] if entry is not None and entry[0]() is owner else None


def install_table(max_num_seqs: int, device: torch.device | str, owner: Any,
                  runner_cls: Any = None) -> RowSlotTable:
    """The row-slot table of the engine whose config is ``owner`` (made on the first call,
    by a metadata builder in per-channel K mode; dropped with the config), with every
    ``runner_cls._update_states`` (vLLM's ``GPUModelRunner`` by default) stepping the
    table of its own config, as ``wrap_update_states`` does for one runner. Idempotent."""
    table = table_of(owner)
    if table is None:
        key = id(owner)

        def forget(ref: weakref.ref) -> None:
            if _tables.get(key, (None,))[0] is ref:
                del _tables[key]

        table = RowSlotTable(max_num_seqs, device)
        _tables[key] = (weakref.ref(owner, forget), table)
    elif table.slots.num_slots != max_num_seqs:
        raise RuntimeError(f"the engine's row-slot table holds {table.slots.num_slots} "
                           f"slots, not {max_num_seqs}: its builders disagree")
    if runner_cls is None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as runner_cls

    @wrap_once(runner_cls, "_update_states")
    def _update_states(original, self: Any, scheduler_output: Any) -> Any:
        result = original(self, scheduler_output)
        own = table_of(getattr(self, "vllm_config", None))
        if own is not None:
            _step_after_update(self, scheduler_output, own)
        return result

    return table
