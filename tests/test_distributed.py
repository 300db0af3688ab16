"""Data parallelism over MLX's ring backend: two local processes started by `mlx.launch`
on loopback train the same streams as one process on the same global batches (also
when a run stopped alone resumes on two), distil the same file as one process, and stop
with a clear error when they disagree on their data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_train import counting_records
from tiny_folder import make_tiny_folder

from specstream_mlx.checkpoint import STREAMS_FILE
from specstream_mlx.jsonl import write_jsonl
from specstream_mlx.training.data import distill
from specstream_mlx.training.distributed import Group
from specstream_mlx.training.train import TrainArgs, train

LAUNCH = Path(sys.executable).parent / "mlx.launch"
SETTINGS = ["--num-streams", "2", "--msa-layers", "2", "--adapter-rank", "4",
            "--lr", "1e-2", "--warmup", "2", "--epochs", "2",
            "--batch-size", "6", "--max-length", "96", "--steps-per-report", "3",
            "--steps-per-eval", "100", "--steps-per-checkpoint", "100"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    folder, _ = make_tiny_folder(root / "base")
    # 27 examples, batches of 6: the last global batch has 3, one rank gets 1.
    write_jsonl(root / "train.jsonl", counting_records(27, seed=3))
    write_jsonl(root / "valid.jsonl", counting_records(6, seed=4))
    write_jsonl(root / "other.jsonl", counting_records(27, seed=5))
    return root, folder


def launch(root: Path, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring` of a shell command (MLX_RANK is set in it)."""
    if not LAUNCH.exists():
        pytest.fail(f"{LAUNCH} is missing: mlx's launcher comes with the mlx package")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Its own session, so a timeout stops the launcher's processes too (a rank blocked in
    # a collective spins on a core until killed).
    proc = subprocess.Popen([str(LAUNCH), "-n", "2", "--backend", "ring", "--cwd", str(root),
                             "bash", "-c", command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch ran past {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def specstream() -> str:
    code = "import sys; from specstream_mlx.cli import main; sys.exit(main())"
    return f"{sys.executable} -c '{code}'"


def test_a_group_of_one_without_a_launcher():
    group = Group()
    assert (group.rank, group.size, group.main) == (0, 1, True)
    x = mx.array([1.0, 2.0])
    assert group.all_sum(x) is x
    assert group.gather_bytes(b"abc") == [b"abc"]
    group.check_same("anything", "text")  # nothing to compare with


def flags(root: Path, folder: Path) -> list[str]:
    return SETTINGS + ["--data", str(root / "train.jsonl"), "--valid",
                       str(root / "valid.jsonl"), "--model", str(folder)]


def train_args(args: list[str], run_dir: Path) -> TrainArgs:
    """The TrainArgs of command-line flags (all of them valued)."""
    values = {a[2:].replace("-", "_"): v for a, v in zip(args[::2], args[1::2], strict=True)}
    kinds = {f: type(getattr(TrainArgs("x"), f)) for f in values}
    return TrainArgs(**{k: kinds[k](v) if kinds[k] is not type(None) else v
                        for k, v in values.items()}, run_dir=str(run_dir))


@pytest.fixture(scope="module")
def single(setup):
    """The streams of one process trained with `flags`."""
    root, folder = setup
    with pytest.warns(UserWarning, match="no speculative streams"):
        train(train_args(flags(root, folder), root / "one"), log=lambda _: None)
    return mx.load(str(root / "one" / "model" / STREAMS_FILE))


def assert_same_streams(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(np.array(got[name]), np.array(want[name]), rtol=1e-3,
                                   atol=1e-5, err_msg=name)
    moved = max(float(mx.abs(want[k]).max()) for k in want if k.endswith("_b"))
    assert moved > 1e-3  # the adapters trained (they start at zero)


def test_two_processes_train_the_streams_of_one(setup, single):
    root, folder = setup
    args = flags(root, folder)
    shutil.rmtree(root / "two", ignore_errors=True)
    result = launch(root, f"{specstream()} train {' '.join(args)} --run-dir two "
                          "--dist-timeout 120")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "data-parallel over 2 processes" in out
    assert out.count("streams written to") == 1  # rank 0 alone writes
    steps = [line for line in out.splitlines() if line.startswith("step ") and "tokens/s" in line]
    assert len(steps) == 4 and all("(per rank: " in line for line in steps)
    assert "validation:" in out
    # Each rank cached the frozen hidden states of its own share only.
    assert sorted(p.name for p in (root / "two").glob("hidden-train*")) == [
        "hidden-train-rank0of2.safetensors", "hidden-train-rank1of2.safetensors"]
    assert_same_streams(mx.load(str(root / "two" / "model" / STREAMS_FILE)), single)


def test_a_run_stopped_alone_resumes_on_two_processes(setup, single):
    root, folder = setup
    args = flags(root, folder)
    run = root / "resumed"
    shutil.rmtree(run, ignore_errors=True)

    class Stop(Exception):
        pass

    def stop_at_step_5(line: str) -> None:
        if line.startswith("step 6/"):
            raise Stop

    partial = train_args(args + ["--steps-per-checkpoint", "5"], run)
    with pytest.warns(UserWarning), pytest.raises(Stop):
        train(partial, log=stop_at_step_5)
    assert not (run / "model").exists()
    result = launch(root, f"{specstream()} train {' '.join(args)} --steps-per-checkpoint 5 "
                          f"--run-dir {run} --resume --dist-timeout 120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed at step 5" in result.stdout
    assert_same_streams(mx.load(str(run / "model" / STREAMS_FILE)), single)


def test_ranks_that_disagree_on_the_data_stop_with_a_clear_error(setup):
    root, folder = setup
    data = '$([ "$MLX_RANK" = 0 ] && echo train.jsonl || echo other.jsonl)'
    result = launch(root, f"{specstream()} train {' '.join(SETTINGS)} --data {data} "
                          f"--model {folder} --run-dir bad --dist-timeout 60", timeout=200)
    # mlx.launch itself exits 0 whatever its processes do; it reports their codes.
    out = result.stdout + result.stderr
    # The first rank to stop exits with the CLI's input-error code (the launcher may
    # stop the other before it reports).
    assert re.search(r"Node with rank [01] exited with code 2", out)
    assert "the 2 processes disagree on the data" in out
    assert not (root / "bad" / "model").exists()


def test_two_processes_distil_the_file_of_one(setup):
    root, folder = setup
    records = [{"id": str(i), "prompt": p} for i, p in enumerate(
        ["hi", "def f(x):", "Hello there, how are you?", "count from a", "ok", "why?",
         "a longer prompt than the others, with words"])]
    # Multi-turn records: a later turn's batches need the answers of every rank.
    records += [{"id": f"t{i}", "turns": t} for i, t in enumerate(
        [["hi", "and then?"], ["ok", "why?", "go on"], ["a b c", "d e f"]])]
    write_jsonl(root / "prompts.jsonl", records)
    with pytest.warns(UserWarning, match="no speculative streams"):
        distill(folder, records, max_tokens=6, batch_size=2, out_path=root / "one.jsonl",
                progress=False)
    script = (f"import json; from specstream_mlx.jsonl import read_jsonl; "
              f"from specstream_mlx.training.data import distill; "
              f"from specstream_mlx.training.distributed import Group; "
              f"distill('{folder}', read_jsonl('prompts.jsonl'), max_tokens=6, batch_size=2, "
              f"out_path='two.jsonl', progress=False, group=Group(60))")
    result = launch(root, f'{sys.executable} -c "{script}"')
    assert "exited with code" not in result.stderr, result.stdout + result.stderr
    assert (root / "two.jsonl").read_text() == (root / "one.jsonl").read_text()
    assert [json.loads(line)["id"] for line in (root / "two.jsonl").read_text().splitlines()] \
        == [r["id"] for r in records]
    assert not list(root.glob("two.jsonl.rank*"))  # the ranks' parts are merged away


def test_a_process_that_waits_too_long_stops_with_a_message():
    """The deadline around a collective: past the timeout the process exits (code 3)
    naming what it waited for, instead of hanging."""
    code = ("import time; from specstream_mlx.training.distributed import Group; "
            "g = Group(timeout=1)\n"
            "with g.deadline('waiting for a test', active=True): time.sleep(30)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3
    assert "waited 1 s for the other processes while waiting for a test" in result.stderr
