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
