"""CADET under `accelerate launch` with two CPU processes (gloo): tests/scripts/distributed_run.py runs the training
and writes what each rank saw; this file compares the ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).parent / "scripts" / "distributed_run.py"
GOOD = {0, 2, 3, 5}  # as in the script: prompts the toy oracle calls satisfying


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("distributed")
    # `--cpu --num_processes 2` starts a single process in accelerate 1.15; `--multi_gpu` with no GPU visible starts
    # two through torchrun, which then pick the gloo backend (DistributedType.MULTI_CPU)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
        str(SCRIPT),
        str(output_dir),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = [json.loads((output_dir / f"rank-{rank}.json").read_text()) for rank in range(2)]
    return output_dir, results


def test_two_cpu_processes_really_ran(ranks):
    _, (r0, r1) = ranks
    assert [r0["rank"], r1["rank"]] == [0, 1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["distributed_type"] == "DistributedType.MULTI_CPU"


def test_prompts_are_split_across_processes_and_labels_gathered(ranks):
    _, (r0, r1) = ranks
    for round_index in ("0", "1"):
        mine, theirs = r0["shares"][round_index], r1["shares"][round_index]
        assert len(mine) == len(theirs) == 3  # prompts_per_round=6 over two processes
        assert not set(mine) & set(theirs), "the two processes sampled the same prompts"
    for result in (r0, r1):
        # Each process judged only its own share (3 prompts x 2 generations) ...
        assert [len(call["prompts"]) for call in result["oracle_calls"]] == [6, 6]
        assert [sorted(set(c["prompts"])) for c in result["oracle_calls"]] == [
            sorted(result["shares"][r]) for r in ("0", "1")
        ]
        # ... and trained the NADO model on everyone's samples
        assert {record["num_samples"] for record in result["records"]} == {12}


def test_nado_is_identical_on_every_rank_after_each_round(ranks):
    _, (r0, r1) = ranks
    assert [r["step"] for r in r0["records"]] == [r["step"] for r in r1["records"]] == [1, 2, 3, 4]
    for a, b in zip(r0["records"], r1["records"], strict=True):
        assert a["nado"] == b["nado"], f"NADO weights differ across ranks at step {a['step']}"
        assert a["sample_scores"] == b["sample_scores"]
    assert r0["records"][0]["nado"] != r0["records"][2]["nado"], "the NADO model was not retrained in round 1"


def test_lm_gradients_are_synchronised(ranks):
    """With Ω's gradient bounded (`cadet_max_grad_ratio`, binding on some step): the trainer's two extra gradients per
    step leave DDP's reduction intact."""
    _, (r0, r1) = ranks
    assert r0["lm_before"] == r1["lm_before"]
    assert r0["lm_after"] != r0["lm_before"], "the LM did not train"
    assert r0["lm_after"] == r1["lm_after"], "the LM's parameters differ across ranks after training"
    assert r0["omega_scales"] and min(r0["omega_scales"]) < 1.0


def test_logged_satisfaction_is_the_global_rate(ranks):
    _, (r0, r1) = ranks
    local = [[sum(c["scores"]) / len(c["scores"]) for c in r["oracle_calls"]] for r in (r0, r1)]
    expected = [
        (sum(a["scores"]) + sum(b["scores"])) / (len(a["scores"]) + len(b["scores"]))
        for a, b in zip(r0["oracle_calls"], r1["oracle_calls"], strict=True)
    ]
    assert r0["logged_satisfaction"] == pytest.approx(expected)
    assert r1["logged_satisfaction"] == pytest.approx(expected)
    # The check means something only if some process's own rate differs from the global one
    assert any(rate != pytest.approx(g) for rates in local for rate, g in zip(rates, expected, strict=True)), local
    assert r0["logged_dropped"] == r1["logged_dropped"] == [0.0, 0.0]


def test_only_the_main_process_writes_checkpoints_and_model_card(ranks):
    output_dir, (r0, r1) = ranks
    # Trainer saves each process's RNG state into the checkpoint (and creates its folder to do so); nothing else
    for path in r1["written"]:
        name = os.path.basename(path)
        assert name in (".checkpoint-in-progress", "rng_state_1.pth") or name.startswith("checkpoint-"), path
    assert "README.md" in r0["written"] and "README.md" not in r1["written"]
    assert any(p.endswith("checkpoint-4/cadet_state.json") for p in r0["written"])
    for step in (2, 4):
        checkpoint = output_dir / f"checkpoint-{step}"
        for name in ("cadet_state.json", "nado_optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"):
            assert (checkpoint / name).is_file(), f"{checkpoint / name} is missing"
    assert not (output_dir / ".checkpoint-in-progress").exists()
    assert "2410.05559" in (output_dir / "README.md").read_text()


def test_oracle_phase_on_an_fsdp2_sharded_policy(ranks):
    """torch's FSDP2 over the same two CPU processes: completions of different lengths on each rank, collective
    forward passes, and the parallel schedule's snapshot refused with a clear error."""
    _, (r0, r1) = ranks
    f0, f1 = r0["fsdp2"], r1["fsdp2"]
    assert f0["num_prompts"] == f1["num_prompts"] == 3
    assert f0["num_samples"] == f1["num_samples"] == 12
    assert f0["nado_trained"] and f0["nado"] == f1["nado"]
    assert f0["satisfaction"] == f1["satisfaction"]
    assert "sharded" in f0["snapshot_error"] and "round_schedule='sequential'" in f0["snapshot_error"]


def test_the_parallel_schedule_is_refused_with_several_processes(ranks):
    _, (r0, r1) = ranks
    assert r0["parallel_error"] == r1["parallel_error"]
    assert "Use `round_schedule='sequential'` with several processes" in r0["parallel_error"]


def test_filter_corpus_scores_each_share_once_and_keeps_the_same_examples(ranks):
    _, (r0, r1) = ranks
    f0, f1 = r0["filter"], r1["filter"]
    # Each process scored half of the 10 examples, the two halves together the whole corpus
    assert len(f0["scored"]) == len(f1["scored"]) == 5
    assert sorted(f0["scored"] + f1["scored"]) == sorted(
        f"bad day {i}" if i % 3 == 0 else f"good morning {i}" for i in range(10)
    )
    # Both dropped the examples either process scored unsatisfied, and counted both processes' calls
    for kept in (f0["kept"], f1["kept"]):
        assert len(kept) == 6 and not any("bad day" in text for text in kept)
    assert f0["kept"] == f1["kept"]
    assert f0["oracle_calls"] == f1["oracle_calls"] == 10


def test_unsatisfied_prompts_are_drawn_from_every_processs_labelled_completions(ranks):
    """`unsatisfied_prompts_share`: the corpus completions are labelled in shares, and every process draws the round's
    eliciting prompts from all of them, the same draw split by rank."""
    _, (r0, r1) = ranks
    mine, theirs = r0["filter"]["round_prompts"], r1["filter"]["round_prompts"]
    assert len(mine) == len(theirs) == 3  # prompts_per_round=6 over two processes
    unsatisfied = {f"hello {i}" for i in range(0, 10, 3)}  # the "bad day" replies, labelled by both processes
    # The draw is three uniform prompts, then three distinct unsatisfied ones; rank 0 takes its 1st, 3rd and 5th
    eliciting = [mine[2], theirs[1], theirs[2]]
    assert set(eliciting) <= unsatisfied and len(set(eliciting)) == 3
