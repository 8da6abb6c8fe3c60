"""scripts/device_pipeline.sh runs a plan's steps in lanes, time-boxed, and reports each in
its progress file; the plans under scripts/plans name files that exist. Run here with
NO_BUILD=1 and plain shell commands: the GPU machine is not needed to check the runner."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLANS = sorted((ROOT / "scripts" / "plans").glob("*.plan"))


def _run(tmp_path: Path, *plans: str, check: bool = True, build: bool = False,
         gpus: int | None = None) -> list[str]:
    """Runs the pipeline over the plans' texts; a text may end in `:<steps>`, a selection."""
    specs = []
    for i, text in enumerate(plans):
        text, _, only = text.partition("\n:")
        plan = tmp_path / f"test{i}.plan"
        plan.write_text(text)
        specs.append(f"{plan}:{only}" if only else str(plan))
    out_dir, tree = tmp_path / "results", tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    env = dict(os.environ, PIPELINE_DIR=str(out_dir), PIPELINE_SRC=str(tmp_path / "src"),
               NO_BUILD="0" if build else "1")
    if gpus is not None:
        env["PIPELINE_GPUS"] = str(gpus)
    subprocess.run(["bash", str(ROOT / "scripts" / "device_pipeline.sh"), "+".join(specs),
                    "c0ffee"], cwd=tree, env=env, check=check, timeout=60)
    return (out_dir / "progress").read_text().splitlines()


def test_lanes_steps_time_boxes_and_substitution(tmp_path):
    progress = _run(
        tmp_path,
        "# a comment line\n"
        "0 first 10 echo gpu=$CUDA_VISIBLE_DEVICES dir={D} commit=$BITDECODE_COMMIT\n"
        "0 second 1 sleep 5  # runs out of time\n"
        "1 failing 10 exit 3\n"
        "1 reads_stdin 10 cat\n"  # must not eat the lane's remaining steps
        "1 after_reader 10 echo still here\n"
        "all last 10 echo visible=${CUDA_VISIBLE_DEVICES:-every}\n")
    steps = {m.group(1): m for line in progress
             if (m := re.match(r"STEP (\S+) rc=(\d+) secs=\d+ :: (.*)$", line))}
    assert steps["first"].group(2) == "0"
    assert steps["first"].group(3) == f"gpu=0 dir={tmp_path / 'results'} commit=c0ffee"
    assert steps["second"].group(2) == "124"
    assert steps["failing"].group(2) == "3"
    assert steps["last"].group(3) == "visible=every"
    assert steps["after_reader"].group(3) == "still here"
    # a lane's steps in order; the `all` steps after every lane; ALLDONE last
    order = [line.split()[1] for line in progress]
    assert order.index("first") < order.index("second") < order.index("LANE0DONE")
    assert max(order.index("LANE0DONE"), order.index("LANE1DONE")) < order.index("last")
    assert order[-1] == "ALLDONE"


def test_steps_run_from_a_private_copy_of_the_tree(tmp_path):
    # the device tool writes the working tree over the repository root on every call; a
    # step must not see that, and the kit's large parts are not copied
    tree = tmp_path / "tree"
    (tree / ".kit").mkdir(parents=True)
    (tree / ".kit" / "p00").write_text("part")
    (tree / "module.py").write_text("v1")
    progress = _run(tmp_path,
                    f"0 rewritten 10 echo v2 > {tree}/module.py; cat module.py\n"
                    "0 where 10 pwd; test -e .kit && echo kit || echo no kit\n")
    outputs = {line.split()[1]: line.split(" :: ", 1)[1] for line in progress
               if " :: " in line}
    assert outputs["rewritten"] == "v1"
    assert (tree / "module.py").read_text() == "v2\n"
    assert outputs["where"] == "no kit"  # (pwd's line is the one before)
    assert (tmp_path / "results" / "where.log").read_text().splitlines()[0] == str(
        tmp_path / "src")


def test_plans_joined_by_plus_run_as_one(tmp_path):
    progress = _run(tmp_path, "0 a1 10 true\n1 b1 10 true\nall merge_a 10 true\n",
                    "0 a2 10 true\nall merge_b 10 true\n")
    order = [line.split()[1] for line in progress]
    assert order.count("LANE0DONE") == 1  # one lane 0 for both plans, in their order
    assert order.index("a1") < order.index("a2") < order.index("LANE0DONE")
    assert "b1" in order
    assert order.index("LANE1DONE") < order.index("merge_a") < order.index("merge_b")
    assert order[-1] == "ALLDONE"


def test_fewer_gpus_than_lanes_runs_the_steps_in_plan_order(tmp_path):
    # an x2 plan on a one-GPU machine: nothing may run side by side on the one GPU, and
    # a merge written between two plans' steps still follows the steps it merges
    progress = _run(tmp_path,
                    "0 a 10 echo gpu=$CUDA_VISIBLE_DEVICES\n1 b 10 echo gpu=$CUDA_VISIBLE_DEVICES\n"
                    "all merge 10 echo visible=${CUDA_VISIBLE_DEVICES:-every}\n",
                    "0 c 10 true\n1 d 10 true\n", gpus=1)
    assert progress[0] == "STEP SERIAL 1 GPU(s) for lanes 0 1"
    order = [line.split()[1] for line in progress]
    assert order == ["SERIAL", "a", "b", "merge", "c", "d", "ALLDONE"]
    assert [line.split(" :: ")[1] for line in progress[1:4]] == ["gpu=0", "gpu=0",
                                                                   "visible=every"]
    # as many GPUs as lanes: lanes side by side, lane 1 on GPU 1
    progress = _run(tmp_path, "0 a 10 true\n1 b 10 echo gpu=$CUDA_VISIBLE_DEVICES\n", gpus=2)
    assert "STEP LANE1DONE" in progress and progress[-1] == "STEP ALLDONE"
    assert any(line.startswith("STEP b rc=0") and line.endswith(":: gpu=1")
               for line in progress)


def test_plan_step_selection(tmp_path):
    progress = _run(tmp_path, "0 first 10 true\n",
                    "0 x 10 true\n0 y 10 true\n1 z 10 true\n:x,z")
    order = [line.split()[1] for line in progress]
    assert {"first", "x", "z"} <= set(order) and "y" not in order


def test_misspelt_step_stops_before_running_anything(tmp_path):
    # build=True: the plans are read first, so the build (here a pip install that would
    # fail in an empty folder) never starts
    progress = _run(tmp_path, "0 first 10 true\n", "0 x 10 true\n:x,nosuch", check=False,
                    build=True)
    assert progress == [f"STEP ALLDONE no-step nosuch in {tmp_path / 'test1.plan'}"]


def test_a_step_name_twice_in_joined_plans_stops_the_run(tmp_path):
    progress = _run(tmp_path, "0 same 10 true\n", "1 same 10 true\n", check=False)
    assert progress == ["STEP ALLDONE step-twice same"]


def test_ab_plan_without_its_patch_stops_before_the_build(tmp_path, monkeypatch):
    plan = "1 build_base 10 patch -R -p1 < docs/patches/$AB_PATCH\n"
    monkeypatch.delenv("AB_PATCH", raising=False)
    progress = _run(tmp_path, plan, check=False, build=True)
    assert progress == ["STEP ALLDONE no-ab-patch '': set AB_PATCH to a file of docs/patches"]
    (tmp_path / "tree" / "docs" / "patches").mkdir(parents=True)
    (tmp_path / "tree" / "docs" / "patches" / "x.patch").write_text("")
    monkeypatch.setenv("AB_PATCH", "x.patch")
    progress = _run(tmp_path, plan, check=False)
    assert progress[0].startswith("STEP build_base rc=")


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_plans_are_well_formed(plan):
    names = []
    for raw in plan.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        lane, name, secs, *command = line.split()
        assert lane == "all" or lane.isdigit(), raw
        assert 0 < int(secs) <= 900, raw  # at most half a session's 30 device-minutes
        assert command, raw
        names.append(name)
        # the repository files a step names exist (a renamed test must rename its step)
        for word in shlex.split(" ".join(command)):
            if re.match(r"(tests|benchmarks|scripts)/\S+\.(py|sh)$", word):
                assert (ROOT / word).exists(), f"{plan.name}: {word}"
    assert names and len(names) == len(set(names)), f"{plan.name}: step names repeat"


def test_poll_marker_is_an_extended_regex(tmp_path):
    """`STEP a|ALLDONE` returns once either is in the progress file: as a basic regex it
    matched only itself, and such polls waited out their whole time on the GPU machine."""
    (tmp_path / "progress").write_text("STEP build rc=0 secs=1 :: ok\nSTEP kernels rc=0\n")
    env = dict(os.environ, PIPELINE_DIR=str(tmp_path))
    env.pop("OUT", None)
    poll = ["bash", str(ROOT / "scripts" / "device_poll.sh"), "30"]
    done = subprocess.run([*poll, "STEP kernels|ALLDONE"], env=env, capture_output=True,
                          text=True, timeout=20)  # well before its 30 s
    assert "STEP kernels rc=0" in done.stdout
