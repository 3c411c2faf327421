"""The distributed path gives the numbers of the single-process path.

Real ranks come from torchrun (``tests/dist_worker.py``); the clustering actor runs on
a local Ray. Extraction parts are planted so that the right clustering is known.
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from k2l_dist.clustering.rounds import recover
from k2l_dist.clustering.store import PointSet
from k2l_dist.config import ClusterConfig
from tests.processes import ROOT, canonical, planted_parts, torchrun


def _worker(check: str, out: Path) -> None:
    res = torchrun([str(ROOT / "tests" / "dist_worker.py"), check, str(out)], timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# --------------------------------------------------------------------------- real ranks


@pytest.mark.timeout(240)
def test_ddp_gradients_of_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    from tests.dist_worker import detector_grads, fixed_batch, tiny_model

    _worker("ddp_grads", tmp_path)
    ddp = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    single = detector_grads(tiny_model(), *fixed_batch())
    assert ddp.keys() == single.keys() and len(single) > 10
    for name, grad in single.items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.timeout(240)
def test_collectives_move_exact_arrays_and_catch_diverged_replicas(tmp_path):
    _worker("collectives", tmp_path)  # the worker asserts the gathered / broadcast values
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"collectives_rank{rank}.json").read_text())
        assert "replicas diverged after a nudge" in seen["diverged"], seen


@pytest.mark.timeout(240)
def test_inline_service_gives_every_rank_the_single_process_labels(tmp_path):
    _worker("inline_service", tmp_path)  # the worker compares the arrays with one-process clustering
    stats = [json.loads((tmp_path / f"inline_rank{r}.json").read_text()) for r in (0, 1)]
    assert stats[0] == stats[1] and stats[0]["images"] == 60


# --------------------------------------------------------------------------- merge and actor


def _same_parts(n: int) -> list[dict[str, np.ndarray]]:
    """One fixed dataset dealt to n ranks (the same points, whatever n)."""
    whole = canonical(planted_parts(1, seed=3))
    owner = np.random.default_rng(n).integers(0, n, len(whole["sample_ids"]))
    parts = []
    for p in range(n):
        ids = whole["sample_ids"][owner == p]
        rows = np.isin(whole["image_ids"], ids)
        part = {k: v[rows] for k, v in whole.items() if k != "sample_ids"}
        part["sample_ids"] = ids
        parts.append(part)
    return parts


def test_merge_is_canonical_whatever_the_split_and_arrival_order():
    one = canonical(_same_parts(1))
    for n in (2, 3):
        parts = _same_parts(n)
        assert all(len(p["sample_ids"]) for p in parts)
        for order in (list(range(n)), list(reversed(range(n)))):
            merged = canonical([parts[i] for i in order])
            assert merged.keys() == one.keys()
            for key in one:
                assert np.array_equal(merged[key], one[key]), key
    assert not np.all(np.diff(planted_parts(1)[0]["image_ids"]) >= 0)  # the parts arrive unsorted
    with pytest.raises(ValueError, match="two ranks"):
        PointSet.from_parts([planted_parts(1)[0], planted_parts(1)[0]])


@pytest.fixture(scope="class")
def local_ray():
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, log_to_driver=False)
    yield ray
    ray.shutdown()


class TestOnOneLocalRay:
    """The actor tests that share one local Ray (started once for the three)."""

    @pytest.mark.slow
    @pytest.mark.timeout(300)
    def test_actor_labels_equal_inline_for_1_2_3_way_splits_in_random_order(self, local_ray):
        from k2l_dist.clustering.actor import ClusteringActor, split_part

        ray = local_ray
        cfg = ClusterConfig(K=4, M=8, nredo=2, threads=1)
        expected = recover("round", PointSet.from_parts(_same_parts(1)), cfg)
        for n in (1, 2, 3):
            parts = _same_parts(n)
            actor = ray.remote(ClusteringActor).options(max_concurrency=n + 2).remote(dataclasses.asdict(cfg), n)
            order = np.random.default_rng(n).permutation(n)
            refs = {int(r): [ray.put(half) for half in split_part(parts[r])] for r in order}
            for r in order:
                actor.submit.remote("round1/try0", int(r), refs[int(r)], "round")
            results = ray.get([actor.result.remote("round1/try0", 60) for _ in range(n)])
            for stats, (labels_ref,) in results:
                got = ray.get(labels_ref)
                for key, value in expected.arrays().items():
                    assert np.array_equal(got[key], value), (n, key)
                assert stats["kept"] == expected.stats["kept"]
            ray.kill(actor)


    @pytest.mark.timeout(120)
    def test_actor_clusters_on_the_threads_it_was_given_despite_rays_single_thread_default(self, local_ray):
        """Ray starts actors with OMP_NUM_THREADS=1 and OpenMP counts threads per calling thread:
        the clustering (in one of the actor's pool threads) must still use cluster.threads."""
        from k2l_dist.clustering.actor import ClusteringActor, split_part

        ray = local_ray
        cfg = ClusterConfig(K=4, M=8, nredo=1, threads=2)
        actor = ray.remote(ClusteringActor).options(max_concurrency=3, num_cpus=0).remote(dataclasses.asdict(cfg), 1)
        actor.submit.remote("round1/try0", 0, [ray.put(h) for h in split_part(_same_parts(1)[0])], "round")
        stats, _ = ray.get(actor.result.remote("round1/try0", 60))
        assert stats["actor_faiss_threads"] == 2
        ray.kill(actor)


    @pytest.mark.slow
    @pytest.mark.timeout(300)
    def test_actor_over_2_and_3_shard_holders_gives_the_inline_labels(self, local_ray):
        """One algorithm for every layout: holders on their own actors, each reading only its
        parts from the object store, give the labels of clustering everything in one process."""
        from k2l_dist.clustering.actor import ClusteringActor, split_part

        ray = local_ray
        base = ClusterConfig(K=4, M=8, nredo=2, threads=1, niter=10)
        one = recover("round", PointSet.from_parts(_same_parts(1)), base)
        for shards in (2, 3):
            parts = _same_parts(2)
            cfg = dataclasses.replace(base, shards=shards)
            options = ray.remote(ClusteringActor).options(max_concurrency=5, num_cpus=0)
            actor = options.remote(dataclasses.asdict(cfg), 2)
            for r in (1, 0):
                actor.submit.remote("round1/try0", r, [ray.put(h) for h in split_part(parts[r])], "round")
            stats, (ref,) = ray.get(actor.result.remote("round1/try0", 120))
            got = ray.get(ref)
            for key, value in one.arrays().items():
                assert np.array_equal(got[key], value), (shards, key)
            assert stats["actor_holders"] == shards and stats["kept"] == one.stats["kept"]
            assert stats["object_store_round_bytes"] > 0
            ray.kill(actor)


def _service(restarts: int):
    from k2l_dist.clustering.ray_service import RayService
    from k2l_dist.distributed import DistInfo

    cfg = ClusterConfig(K=4, M=8, nredo=2, threads=1, actor_restarts=restarts, object_store_gb=0.2,
                        round_timeout_s=60)
    return cfg, RayService(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu"), 1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_actor_killed_mid_round_is_recreated_and_the_round_redone(monkeypatch, caplog):
    monkeypatch.setenv("K2L_FAULT", "actor:round2")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg, service = _service(restarts=1)
    try:
        part = _same_parts(1)[0]
        service.recover("round", part, "round1")
        # the service starts its actor with one malloc arena: round arrays reuse freed memory
        assert service.timings["actor_malloc_arena_max"] == 1
        labels = service.recover("round", part, "round2")  # the actor dies here once
    finally:
        service.close()
    expected = recover("round", PointSet.from_parts([part]), cfg)
    for key, value in expected.arrays().items():
        assert np.array_equal(labels.arrays()[key], value), key
    assert "redoing the round" in caplog.text and "round2" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_without_restarts_a_dead_actor_fails_the_round_by_name_quickly(monkeypatch):
    from k2l_dist.clustering.ray_service import ClusteringFailed

    monkeypatch.setenv("K2L_FAULT", "actor:round1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _, service = _service(restarts=0)
    t0 = time.time()
    try:
        with pytest.raises(ClusteringFailed, match="round1"):
            service.recover("round", _same_parts(1)[0], "round1")
    finally:
        service.close(clean=False)
    assert time.time() - t0 < 60


# --------------------------------------------------------------------------- threads


def test_threads_are_pinned_to_cores_per_local_rank(monkeypatch, caplog):
    import faiss

    from k2l_dist.distributed import threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "available_cores", lambda: 8)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        monkeypatch.setattr(threads, "_pinned", None)
        assert threads.pin_threads() == 2
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert faiss.omp_get_max_threads() == 2
        assert threads.threads_per_process() == 2  # what DALI pipelines then use
        assert "thrash" not in caplog.text
        assert threads.pin_threads(3) == 3
        assert "3 threads per process × 4 processes on this node > 8 cores" in caplog.text
    finally:
        threads.pin_threads(before)


# --------------------------------------------------------------------------- GPU paths (skipped without a GPU)


def _faiss_gpus() -> int:
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_faiss_gpu_index_reuses_cached_resources_and_matches_cpu():
    from k2l_dist.clustering.kmeans import _flat_index, _gpu_resources, assign

    first, again = _flat_index(8, True), _flat_index(8, True)
    assert "Gpu" in type(first).__name__ or "Shards" in type(first).__name__
    assert _gpu_resources() is _gpu_resources() and again is not first
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    assert np.array_equal(assign(x, c, use_gpu=True)[0], assign(x, c, use_gpu=False)[0])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.timeout(240)
def test_ddp_gradients_over_nccl(tmp_path):
    res = torchrun([str(ROOT / "tests" / "dist_worker.py"), "ddp_grads", str(tmp_path)], timeout=180,
                    env={"K2L_TEST_DEVICE": "cuda"})
    assert res.returncode == 0, res.stderr[-3000:]
    from tests.dist_worker import detector_grads, fixed_batch, tiny_model

    ddp = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    single = detector_grads(tiny_model(), *fixed_batch())
    for name, grad in single.items():  # TF32 convolutions on the GPU: looser tolerance
        torch.testing.assert_close(ddp[name], grad, rtol=2e-2, atol=1e-5, msg=name)
