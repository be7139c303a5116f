"""sweep.py: every init and seed under one GRPO run, resumable, tabulated (real train_grpo.py runs, tiny settings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sweep

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--max_steps", "2", "--save_steps", "2", "--test_max_problems", "16", "--logging_steps", "1", "--kl_prompts", "8"]


def run_sweep(*args, check=True):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sweep") / "compare"
    result = run_sweep("--inits", "rlpo,pissa,full", "--seeds", "0,1", "--kl-steps", "1", "--output-dir", str(output_dir), "--", *QUICK)
    return output_dir, result


def test_sweep_trains_every_init_and_seed(sweep_run):
    output_dir, _ = sweep_run
    for init in ("rlpo", "pissa", "full"):
        for seed in (0, 1):
            summary = json.loads((output_dir / f"{init}-seed{seed}" / "summary.json").read_text())
            assert summary["init"] == init
            assert summary["seed"] == seed
            assert summary["steps"] == 2


def test_sweep_table_matches_run_summaries(sweep_run):
    output_dir, result = sweep_run
    results = json.loads((output_dir / "results.json").read_text())
    rows = {record["init"]: record for record in results["table"]}
    assert set(rows) == {"rlpo", "pissa", "full"}
    after = [json.loads((output_dir / f"pissa-seed{seed}" / "summary.json").read_text())["accuracy_after"] for seed in (0, 1)]
    assert rows["pissa"]["accuracy_after"]["mean"] == pytest.approx(sum(after) / 2)
    assert rows["pissa"]["accuracy_after"]["std"] == pytest.approx(abs(after[0] - after[1]) / 2)
    assert rows["pissa"]["runs"] == 2
    assert results["missing"] == []
    assert "| rlpo |" in (output_dir / "results.md").read_text()
    assert "| pissa |" in result.stdout


def test_sweep_logs_kl_to_initial_policy(sweep_run):
    output_dir, _ = sweep_run
    history = json.loads((output_dir / "rlpo-seed0" / "log_history.json").read_text())["log_history"]
    kls = [entry["kl_to_init"] for entry in history if "kl_to_init" in entry]
    assert [entry["step"] for entry in history if "kl_to_init" in entry] == [1, 2]
    assert all(kl >= 0 for kl in kls)
    assert max(kls) > 0  # the policy moved after a step
    results = json.loads((output_dir / "results.json").read_text())
    rlpo_rows = [row for row in results["runs"] if row["init"] == "rlpo"]
    assert rlpo_rows[0]["max_kl"] == pytest.approx(max(kls))


def test_sweep_measures_gap_to_full_ft(sweep_run):
    output_dir, _ = sweep_run
    results = json.loads((output_dir / "results.json").read_text())
    assert results["full_ft_reference"] == ["full-seed0"]
    runs = {row["run"]: row for row in results["runs"]}
    assert "gap_to_full" not in runs["full-seed0"]  # the reference itself
    for name in ("rlpo-seed0", "pissa-seed1", "full-seed1"):
        assert runs[name]["gap_to_full"] > 0
        assert -1.0 <= runs[name]["cosine_to_full"] <= 1.0
    assert (output_dir / "analysis" / "dynamics.png").exists()
    assert (output_dir / "analysis" / "full_ft_gap.png").exists()


def test_sweep_skips_finished_runs(sweep_run):
    output_dir, _ = sweep_run
    summary_path = output_dir / "rlpo-seed0" / "summary.json"
    before = summary_path.stat().st_mtime_ns
    result = run_sweep("--inits", "rlpo,pissa,full", "--seeds", "0,1", "--kl-steps", "1", "--output-dir", str(output_dir), "--", *QUICK)
    assert summary_path.stat().st_mtime_ns == before
    assert result.stderr.count("Skipping") == 6


def test_sweep_rejects_changed_settings(sweep_run):
    output_dir, _ = sweep_run
    result = run_sweep("--inits", "rlpo", "--seeds", "0", "--kl-steps", "1", "--output-dir", str(output_dir), "--", *QUICK, "--temperature", "0.7", check=False)
    assert result.returncode != 0
    assert "extra_args" in result.stderr
    assert "another --output-dir" in result.stderr


def test_sweep_lr_sweep_folders_and_plot(tmp_path):
    output_dir = tmp_path / "lr"
    run_sweep("--inits", "rlpo", "--seeds", "0", "--lr-sweep", "1e-5,1e-4", "--kl-steps", "0", "--output-dir", str(output_dir), "--", *QUICK)
    results = json.loads((output_dir / "results.json").read_text())
    assert sorted(record["learning_rate"] for record in results["table"]) == [1e-5, 1e-4]
    assert json.loads((output_dir / "rlpo-lr0.0001-seed0" / "summary.json").read_text())["learning_rate"] == 1e-4
    assert (output_dir / "lr_sensitivity.png").exists()
    assert all(record["max_kl"] is None for record in results["table"])


def test_sweep_per_init_lr_and_rank_dry_run():
    result = run_sweep("--inits", "rlpo,pissa", "--seeds", "0", "--lr", "pissa=2e-5", "--rank", "pissa=32", "--output-dir", "unused", "--dry-run")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "--learning_rate" not in lines[0]
    assert "--learning_rate 2e-05" in lines[1]
    assert "--rank 32" in lines[1]
    assert not (ROOT / "unused").exists()


@pytest.mark.parametrize(
    "args, extra, message",
    [
        (["--inits", "rlpo,dora"], [], "unknown init 'dora'"),
        (["--inits", "rlpo", "--seeds", "0,x"], [], "'x' is not a valid int"),
        (["--inits", "rlpo", "--lr", "pissa=2e-5"], [], "'pissa' is not one of --inits"),
        (["--inits", "rlpo", "--lr", "rlpo=2e-5", "--lr-sweep", "1e-5,2e-5"], [], "exclusive"),
        (["--inits", "full", "--rank", "full=8"], [], "'full' trains without an adapter"),
        (["--inits", "rlpo", "--collapse-drop", "1.5"], [], "--collapse-drop 1.5"),
        (["--inits", "rlpo,pissa", "--lr", "rlpo=1e-5,rlpo=2e-5"], [], "sets 'rlpo' twice"),
        (["--inits", "rlpo", "--lr", "rlpo=abc"], [], "'rlpo=abc' has an invalid float value"),
        (["--inits", "rlpo"], ["--seed", "3"], "Use sweep.py's --seeds instead"),
        (["--inits", "rlpo"], ["--not_a_flag", "1"], "train_grpo.py rejects the flags of run rlpo-seed0: Some specified arguments are not used"),
        (["--inits", "rlpo"], ["--kl_prompts", "0"], "Invalid --kl_steps 25, --kl_prompts 0"),
        (["--inits", "rlpo"], ["--max_steps", "x"], "argument --max_steps"),
    ],
)
def test_sweep_bad_input(tmp_path, args, extra, message):
    with pytest.raises(ValueError) as error:
        sweep.main([*args, "--output-dir", str(tmp_path / "out"), "--", *extra])
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_reward_auc_trapezoids():
    assert sweep.reward_auc([10, 20, 40], [0.2, 0.4, 0.4]) == pytest.approx((10 * 0.3 + 20 * 0.4) / 30)
    assert sweep.reward_auc([5], [0.3]) == 0.3
    assert sweep.reward_auc([10, 10], [0.2, 0.4]) == pytest.approx(0.3)
    assert sweep.reward_auc([], []) is None


def test_collapsed_detects_lasting_drop():
    flat = [0.4, 0.42, 0.38, 0.41, 0.39, 0.4, 0.43, 0.37, 0.4, 0.41]
    assert not sweep.collapsed(flat, 0.25)
    falling = [0.4, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03]
    assert sweep.collapsed(falling, 0.25)
    recovered = [0.4, 0.4, 0.2, 0.1, 0.1, 0.3, 0.45, 0.5, 0.5, 0.5]
    assert not sweep.collapsed(recovered, 0.25)
    rising = [0.4, 0.45, 0.5, 0.55, 0.6, 0.62, 0.65, 0.7, 0.7, 0.72]
    assert not sweep.collapsed(rising, 0.25)
    assert sweep.collapsed([0.4, 0.0], 0.25) is None  # too short to judge
