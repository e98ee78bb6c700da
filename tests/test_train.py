"""Training loop: data order, reproducibility, checkpoint/resume, regular = BANG with ε = 0."""

import json

import jax
import numpy as np
import pytest

from bang_jax.models import LeNet
from bang_jax.evaluate import evaluate_accuracy
from bang_jax.train import LENET_SOLVER, BangHParams, batch_indices, train


def test_sequential_order_wraps_like_caffe_lmdb():
    idx = batch_indices(10, 4, 0, 4)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]])
    np.testing.assert_array_equal(batch_indices(10, 4, 2, 1), idx[2:3])


def test_shuffled_order_is_a_permutation_per_epoch_and_reproducible():
    idx = batch_indices(12, 4, 0, 6, order="shuffled", data_seed=3)
    for epoch in (idx[:3].ravel(), idx[3:].ravel()):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(12))
    assert not np.array_equal(idx[:3].ravel(), np.arange(12))
    np.testing.assert_array_equal(idx, batch_indices(12, 4, 0, 6, order="shuffled", data_seed=3))
    np.testing.assert_array_equal(idx[4:], batch_indices(12, 4, 4, 2, order="shuffled", data_seed=3))
    with pytest.raises(ValueError, match="order"):
        batch_indices(12, 4, 0, 1, order="random")


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 96).astype(np.int32)
    images = (rng.uniform(0, 60, (96, 28, 28, 1)) + labels[:, None, None, None] * 19).astype(np.uint8)
    return images, labels


HP = [BangHParams("R0", 0.0, seed=1), BangHParams("B1", 0.815, 1.0, seed=2)]


def run(tmp, images, labels, **kw):
    return train(LeNet(), images, labels, HP, solver=LENET_SOLVER, num_steps=12, batch_size=16, out_dir=tmp,
                 checkpoint_every=4, log_every=4, progress=False, **kw)


def test_resume_gives_the_same_final_weights(tmp_path, tiny_data):
    full = run(tmp_path / "full", *tiny_data)
    part = run(tmp_path / "part", *tiny_data, stop_after=5)  # stops at 5, checkpoint written at 5
    assert int(part.states.step[0]) == 5
    resumed = run(tmp_path / "part", *tiny_data, resume=True)
    for a, b in zip(jax.tree.leaves(full.states), jax.tree.leaves(resumed.states)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [d["iteration"] for d in lines if d["model"] == "R0"] == [4, 5, 8, 12]
    assert {"loss", "accuracy", "lr", "grad_norm", "update_norm", "kappa_zero_share"} <= set(lines[0])


def test_regular_model_in_bang_path_equals_plain_training(tmp_path, tiny_data):
    a = train(LeNet(), *tiny_data, HP[:1], solver=LENET_SOLVER, num_steps=6, batch_size=16, progress=False)
    b = train(LeNet(), *tiny_data, HP[:1], solver=LENET_SOLVER, num_steps=6, batch_size=16, progress=False, method="plain")
    for x, y in zip(jax.tree.leaves(a.variables[0]), jax.tree.leaves(b.variables[0])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


def test_vmap_and_loop_batching_agree(tiny_data):
    kw = dict(solver=LENET_SOLVER, num_steps=4, batch_size=16, progress=False)
    a = train(LeNet(), *tiny_data, HP, model_batching="loop", **kw)
    b = train(LeNet(), *tiny_data, HP, model_batching="vmap", **kw)
    for x, y in zip(jax.tree.leaves(a.states.params), jax.tree.leaves(b.states.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_bad_arguments(tiny_data):
    images, labels = tiny_data
    with pytest.raises(ValueError, match="labels"):
        train(LeNet(), images, labels[:5], HP, solver=LENET_SOLVER, num_steps=1, batch_size=4)
    with pytest.raises(ValueError, match="unique"):
        train(LeNet(), images, labels, [HP[0], HP[0]], solver=LENET_SOLVER, num_steps=1, batch_size=4)
    with pytest.raises(ValueError, match="epsilon"):
        BangHParams("X", epsilon=float("nan"))


@pytest.mark.slow
def test_full_lenet_schedule_reaches_99_percent(mnist):
    """The paper's LeNet solver for all 10,000 iterations (≈ 3.5 min per model on a 2-core CPU)."""
    result = train(LeNet(), mnist.train_images, mnist.train_labels, [BangHParams("R0", 0.0, seed=0)],
                   solver=LENET_SOLVER, num_steps=10_000, batch_size=64, progress=False)
    acc = evaluate_accuracy(LeNet(), result.variables[0], mnist.test_images, mnist.test_labels)
    print(f"LeNet R0 after 10,000 iterations: {acc:.2f}% test accuracy")
    assert acc >= 99.0


def test_models_shard_over_several_devices_with_the_same_result(tmp_path):
    """Two forced host devices: the vmapped models are split over them and train exactly as on one device."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, jax, numpy as np
        from bang_jax.models import LeNet
        from bang_jax.train import LENET_SOLVER, BangHParams, train
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, 64).astype(np.int32)
        images = (rng.uniform(0, 60, (64, 28, 28, 1)) + labels[:, None, None, None] * 19).astype(np.uint8)
        hp = [BangHParams("R0", 0.0, seed=1), BangHParams("B1", 0.815, seed=2)]
        r = train(LeNet(), images, labels, hp, solver=LENET_SOLVER, num_steps=3, batch_size=16, progress=False,
                  model_batching="vmap")
        shards = r.states.params["ip1"]["kernel"].sharding
        print(jax.device_count(), len(shards.device_set))
        np.save(sys.argv[1], np.asarray(r.states.params["ip1"]["kernel"]))
    """)
    outs = []
    for count in (1, 2):
        env = dict(__import__("os").environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
        path = tmp_path / f"k{count}.npy"
        res = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-2:] == [str(count), str(count)]
        outs.append(np.load(path))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-7)
