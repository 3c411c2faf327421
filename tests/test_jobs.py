"""Several trainings at once (`k2l ablate --jobs`): each job on its own cores, failures kept apart."""

import os
import sys

import pytest

from k2l_dist.training.jobs import Job, core_sets, gpu_for, run_jobs


def test_core_sets_are_disjoint_and_cover_the_cores():
    sets = core_sets(3, [0, 1, 2, 3, 4, 5, 6])
    assert sorted(c for s in sets for c in s) == list(range(7))
    assert all(s for s in sets) and len({c for s in sets for c in s}) == 7
    assert core_sets(3, [4, 9]) == [[4], [9], [4]]  # more jobs than cores: they share, none is left without


def test_a_slot_gets_a_gpu_this_process_sees():
    assert [gpu_for(k, 2, None) for k in range(3)] == ["0", "1", "0"]
    assert [gpu_for(k, 2, "2,3") for k in range(3)] == ["2", "3", "2"]  # the names, not the indices
    assert gpu_for(1, 2, "GPU-a1, GPU-b2") == "GPU-b2"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux")
def test_jobs_run_on_their_own_cores_and_a_failure_leaves_the_others(tmp_path, capsys):
    show = "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0)))), os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [Job("a", [sys.executable, "-c", show], tmp_path / "a.log"),
            Job("fails", [sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"], tmp_path / "f.log"),
            Job("b", [sys.executable, "-c", show], tmp_path / "b" / "b.log")]
    codes = run_jobs(jobs, parallel=2, gpus=2, poll_s=0.05)
    assert codes == {"a": 0, "fails": 3, "b": 0}
    cores = sorted(os.sched_getaffinity(0))
    slots = core_sets(2, cores)
    header, shown = (tmp_path / "a.log").read_text().splitlines()
    assert header.startswith("=== ") and header.endswith(" ".join(jobs[0].command))  # where the attempt starts
    cores_a, gpu_a = shown.split()
    assert [int(c) for c in cores_a.split(",")] == slots[0] and gpu_a == "0"  # the first job: slot 0's cores, GPU 0
    cores_b, gpu_b = (tmp_path / "b" / "b.log").read_text().splitlines()[-1].split()
    assert ([int(c) for c in cores_b.split(",")], int(gpu_b)) in [(s, k) for k, s in enumerate(slots)]
    assert (tmp_path / "f.log").read_text().splitlines()[-1] == "bad input"
    out = capsys.readouterr().out
    assert "fails: FAILED (exited with code 3); see " + str(tmp_path / "f.log") in out
    assert out.count(": started on cores") == 3


def test_a_failed_run_of_a_parallel_ablation_is_named_with_its_log(tmp_path, monkeypatch):
    from k2l_dist.training import ablate as ablate_module
    from k2l_dist.training import jobs as jobs_module

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("{}")  # prepared: nothing to prepare
    started = []

    def fake_run_jobs(jobs, parallel, gpus=0, poll_s=1.0):
        started.extend(jobs)
        codes = {job.name: (-9 if job.name.startswith(failing) else 0) for job in jobs}
        for job in jobs:
            if codes[job.name] == 0:  # a finished run leaves its metrics
                run_dir = next(a for a in job.command if a.startswith("run_dir=")).split("=", 1)[1]
                os.makedirs(run_dir)
                (tmp_path / run_dir / "metrics.json").write_text('{"forward_nme": 0.1, "backward_nme": 0.2}')
        return codes

    monkeypatch.setattr(jobs_module, "run_jobs", fake_run_jobs)
    failing = "base"
    with pytest.raises(ablate_module.TrainingFailed, match=r"2 of 4 runs failed.*base seed 0 \(killed by signal "
                                                           r"SIGKILL; log: .*base/seed0\.log\)"):
        ablate_module.ablate("configs/quickstart.yaml", [], [], tmp_path, alone=["cluster.M=20"], seeds=2, jobs=2)
    assert [j.name for j in started] == ["base seed 0", "base seed 1", "M=20 seed 0", "M=20 seed 1"]
    # --config: a path with "=" in it (a saved run's config) is not read as an override
    assert started[0].command[1:6] == ["-m", "k2l_dist.cli", "train", "--config", "configs/quickstart.yaml"]
    assert f"run_dir={tmp_path / 'M=20' / 'seed1'}" in started[3].command and "cluster.M=20" in started[3].command
    assert not (tmp_path / "ablation.md").exists()  # without the first setting there is nothing to compare to

    failing, started[:] = "M=20", []  # a rerun: the base is finished now, M=20 fails
    with pytest.raises(ablate_module.TrainingFailed, match=r"2 of 4 runs failed.*M=20 seed 1 \(killed"):
        ablate_module.ablate("configs/quickstart.yaml", [], [], tmp_path, alone=["cluster.M=20"], seeds=2, jobs=2)
    rows = [ln for ln in (tmp_path / "ablation.md").read_text().splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| as configured"]  # the finished setting is kept


def test_settings_that_would_share_a_run_folder_are_refused(tmp_path):
    from k2l_dist.config import ConfigError
    from k2l_dist.training.ablate import ablate

    with pytest.raises(ConfigError, match=r"'stage1.lr=0.002' and 'stage2.lr=0.002' would share the run folder "
                                          r"'lr=0.002'"):
        ablate("configs/quickstart.yaml", [], [], tmp_path, alone=["stage1.lr=0.002", "stage2.lr=0.002"])
    assert not any(tmp_path.iterdir())
