"""The tiny training config the slow tests share: a whole run in seconds on two cores."""

TINY = [
    "progress=false", "data.format=synthetic", "data.synthetic_count=120", "data.synthetic_render_size=96",
    "data.size=48", "data.box=landmarks", "data.box_scale=1.5", "keypoints.count=30", "model.width=16",
    "model.depth=2", "model.descriptor_dim=16", "augment.batch_size=8", "cluster.K=6", "cluster.M=12",
    "stage1.warmup_iters=10", "stage1.iters_per_round=10", "stage1.max_points=24", "stage1.extract_points=12",
    "stage2.iterations=5", "eval.test_count=30", "eval.svt_iters=50", "log_every=5",
    # after 10 warm-up steps few peaks clear the default 0.05: take the top peaks so rounds have labels
    "stage1.detect_threshold=0.0",
]

# The tiny config scaled until the method learns (tests/test_end_to_end.py: it beats the mean
# shape) in about a minute: more images, clusters and iterations; logging and the detection
# threshold back at their defaults.
LEARNS = [
    *TINY, "data.synthetic_count=400", "keypoints.count=40", "model.descriptor_dim=32", "augment.batch_size=16",
    "augment.noise_std=0.0", "cluster.K=12", "cluster.M=30", "stage1.warmup_iters=150", "stage1.rounds=2",
    "stage1.iters_per_round=100", "stage1.lr=0.002", "stage1.max_points=32", "stage1.extract_points=16",
    "stage2.iterations=200", "stage2.lr=0.002", "eval.test_count=100", "eval.svt_iters=300", "log_every=25",
    "stage1.detect_threshold=0.05",
]


def save_tiny_model(path, num_landmarks: int) -> dict:
    """A finished run's ``model.pt`` at ``path``: an untrained Ψ of a tiny model on 32-px
    crops, as the detector loads it. Returns the config dict saved with it."""
    import dataclasses

    import torch

    from k2l_dist.config import Config, apply_values
    from k2l_dist.models import LandmarkNet
    from k2l_dist.utils.checkpoint import save_checkpoint

    cfg = apply_values(Config(), {"model": {"width": 16, "depth": 2, "descriptor_dim": 16}, "data": {"size": 32}})
    saved = dataclasses.asdict(cfg)
    save_checkpoint(path, {"psi": LandmarkNet(cfg.model, num_landmarks).state_dict(), "num_landmarks": num_landmarks,
                           "config": saved, "flip_permutation": torch.arange(num_landmarks)})
    return saved
