"""Training loop: data order, reproducibility, checkpoint/resume, regular = BANG with ε = 0."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bang_jax import BangConfig, bang, caffe_sgd, per_example_grads
from bang_jax.checkpoint import CheckpointError
from bang_jax.data import batch_indices
from bang_jax.evaluate import evaluate_accuracy
from bang_jax.models import LeNet
from bang_jax.solvers import LENET_SOLVER
from bang_jax.train import Checkpoint, LogMetrics, ModelSpec, Snapshots, StopAfter, TrainConfig, train


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


MODELS = [ModelSpec(name="R0", seed=1), ModelSpec(name="B1", seed=2, bang=BangConfig(epsilon=0.815))]


def cfg(steps=12, **kw):
    return TrainConfig(solver=LENET_SOLVER, steps=steps, batch_size=16, **kw)


def run(tmp, data, *, stop=None, resume=False, models=MODELS, config=None):
    callbacks = [LogMetrics(4), Checkpoint(4, resume=resume)] + ([StopAfter(stop)] if stop else [])
    return train(LeNet(), data, models, config or cfg(), tmp, callbacks, progress=False)


def test_resume_gives_the_same_final_weights_and_clean_metrics(tmp_path, tiny_data):
    full = run(tmp_path / "full", tiny_data)
    part = run(tmp_path / "part", tiny_data, stop=5)  # stops at 5, checkpoint written at 5
    assert int(part.states.step[0]) == 5 and part.iteration == 5
    resumed = run(tmp_path / "part", tiny_data, resume=True)
    for a, b in zip(jax.tree.leaves(full.states), jax.tree.leaves(resumed.states)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [json.loads(s) for s in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    r0 = [(d["window_start"], d["iteration"]) for d in lines if d["model"] == "R0"]
    assert r0 == [(0, 4), (5, 8), (8, 12)]  # the 4..5 window was not logged; nothing twice
    assert {"loss", "accuracy", "lr", "grad_norm", "update_norm", "kappa_zero_share"} <= set(lines[0])
    full_lines = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [d for d in lines if d["iteration"] == 12] == [d for d in full_lines if d["iteration"] == 12]


def test_resume_refuses_other_settings_and_fresh_run_refuses_existing_checkpoint(tmp_path, tiny_data):
    run(tmp_path, tiny_data, stop=4)
    other = [MODELS[0], ModelSpec(name="B1", seed=2, bang=BangConfig(epsilon=0.9))]
    with pytest.raises(CheckpointError, match="models"):
        run(tmp_path, tiny_data, resume=True, models=other)
    with pytest.raises(CheckpointError, match="batch_size"):
        run(tmp_path, tiny_data, resume=True, config=TrainConfig(solver=LENET_SOLVER, steps=12, batch_size=8))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run(tmp_path, tiny_data)
    # more steps may be asked for on resume
    assert run(tmp_path, tiny_data, resume=True, config=cfg(steps=16)).iteration == 16


def test_snapshots_on_any_schedule_and_resume_rewrites_them(tmp_path, tiny_data):
    from bang_jax.checkpoint import list_snapshots, snapshot_path

    cbs = lambda resume, stop=None: [LogMetrics(5), Snapshots(every=3, at=[7]), Checkpoint(5, resume=resume)] + (  # noqa: E731
        [StopAfter(stop)] if stop else [])
    train(LeNet(), tiny_data, MODELS, cfg(), tmp_path, cbs(False, stop=8), progress=False)
    assert list_snapshots(tmp_path) == [3, 6, 7]  # checkpoint at 8 (stop); snapshot 9 never reached
    before = snapshot_path(tmp_path, 6).read_bytes()
    # A kill after the snapshot at 9 but before the checkpoint at 10 leaves a snapshot the checkpoint (8) does
    # not cover: resume removes it and writes it again as training passes 9.
    snapshot_path(tmp_path, 9).write_bytes(b"stale")
    train(LeNet(), tiny_data, MODELS, cfg(), tmp_path, cbs(True), progress=False)
    assert list_snapshots(tmp_path) == [3, 6, 7, 9, 12]
    assert snapshot_path(tmp_path, 6).read_bytes() == before
    assert snapshot_path(tmp_path, 9).read_bytes() != b"stale"


def test_regular_model_in_bang_path_equals_plain_training(tiny_data):
    a = train(LeNet(), tiny_data, MODELS[:1], cfg(6), progress=False)
    b = train(LeNet(), tiny_data, MODELS[:1], cfg(6, method="plain"), progress=False)
    for x, y in zip(jax.tree.leaves(a.variables[0]), jax.tree.leaves(b.variables[0])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)


def test_per_example_training_is_the_readme_chain(tiny_data):
    """method='per_example' trains exactly as optax.chain(bang(...), solver) on per_example_grads would."""
    per_layer = ModelSpec(name="B", seed=3, bang=BangConfig(epsilon={"conv1": 0.8, "conv2": 0.7, "ip1": 0.815,
                                                                    "ip2": 0.9}, beta=1.1))
    result = train(LeNet(), tiny_data, [per_layer], cfg(2, method="per_example"), progress=False)
    images, labels = tiny_data
    model = LeNet()
    params = model.init(jax.random.PRNGKey(3), images[:1].astype(np.float32), train=False)["params"]
    tx = optax.chain(bang(config=per_layer.bang), caffe_sgd(LENET_SOLVER.schedule(), 0.9, 5e-4))
    state = tx.init(params)
    key = jax.random.fold_in(jax.random.PRNGKey(3), 1)
    for it in range(2):
        idx = batch_indices(len(images), 16, it, 1)[0]
        pe = per_example_grads(model.apply, {"params": params}, images[idx].astype(np.float32), labels[idx],
                               rngs={"dropout": jax.random.fold_in(key, it)}, train=True)
        updates, state = tx.update(pe.grads, state, params, kappa_norms=pe.kappa_norms, correct=pe.correct)
        params = optax.apply_updates(params, updates)
    for x, y in zip(jax.tree.leaves(result.variables[0]["params"]), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    # Without dropout (whose masks the two methods draw differently) both methods train alike.
    no_drop = LeNet(dropout_rate=0.0)
    a, b = (train(no_drop, tiny_data, [per_layer], cfg(3, method=m), progress=False) for m in ("per_example",
                                                                                              "single_pass"))
    for x, y in zip(jax.tree.leaves(a.variables[0]["params"]), jax.tree.leaves(b.variables[0]["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_vmap_and_loop_batching_agree(tiny_data):
    a = train(LeNet(), tiny_data, MODELS, cfg(4, model_batching="loop"), progress=False)
    b = train(LeNet(), tiny_data, MODELS, cfg(4, model_batching="vmap"), progress=False)
    for x, y in zip(jax.tree.leaves(a.states.params), jax.tree.leaves(b.states.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_bad_arguments(tiny_data):
    images, labels = tiny_data
    with pytest.raises(ValueError, match="labels"):
        train(LeNet(), (images, labels[:5]), MODELS, cfg(1))
    with pytest.raises(ValueError, match="unique"):
        train(LeNet(), tiny_data, [MODELS[0], MODELS[0]], cfg(1))
    with pytest.raises(ValueError, match="plain"):
        train(LeNet(), tiny_data, MODELS, cfg(1, method="plain"))
    with pytest.raises(ValueError, match="epsilon"):
        ModelSpec(name="X", bang=BangConfig(epsilon=float("nan")))
    with pytest.raises(ValueError, match="steps"):
        cfg(0)
    with pytest.raises(ValueError, match="every"):
        LogMetrics(0)
    with pytest.raises(ValueError, match="workdir"):
        train(LeNet(), tiny_data, MODELS, cfg(1), None, [Checkpoint(1)])


@pytest.mark.slow
def test_full_lenet_schedule_reaches_99_percent(mnist):
    """The paper's LeNet solver for all 10,000 iterations (≈ 3.5 min per model on a 2-core CPU)."""
    result = train(LeNet(), mnist, [ModelSpec(name="R0", seed=0)],
                   TrainConfig(solver=LENET_SOLVER, steps=10_000, batch_size=64), progress=False)
    acc = evaluate_accuracy(LeNet(), result.variables[0], mnist.test_images, mnist.test_labels)
    print(f"LeNet R0 after 10,000 iterations: {acc:.2f}% test accuracy")
    assert acc >= 99.0


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not an Exception, so no handler of the loop catches it)."""


@pytest.mark.parametrize("save", [1, 2])  # the checkpoints at iterations 8 (a middle one) and 12 (the final one)
def test_a_kill_at_any_checkpoint_write_leaves_a_run_that_finishes_to_the_same_weights(tmp_path, tiny_data,
                                                                                       monkeypatch, save):
    """A checkpoint is one unit: killed before or after each of its writes (weights+description, readable copy),
    with a temporary file left behind as a real kill leaves it, the run resumes from the previous or the new
    checkpoint — never new weights under an old iteration — and finishes to weights identical to an
    uninterrupted run; the stale temporary is removed."""
    import bang_jax.checkpoint as ckpt

    full = run(tmp_path / "full", tiny_data)
    original = ckpt.atomic_write
    for write in ("state.msgpack", "state.json"):
        for phase in ("before", "after"):
            work = tmp_path / f"{save}-{write}-{phase}"
            seen = {"state.msgpack": 0, "state.json": 0}

            def killing_write(path, data, write=write, phase=phase, seen=seen):
                name = os.path.basename(path)
                if name in seen:
                    seen[name] += 1
                    if name == write and seen[name] == save + 1:  # saves count from 0: the one at 4 is save 0
                        if phase == "after":
                            original(path, data)
                        stray = os.path.join(os.path.dirname(path), f".{name}.killed.tmp")
                        with open(stray, "wb") as f:
                            f.write(data[: len(data) // 2])
                        raise _Killed()
                return original(path, data)

            monkeypatch.setattr(ckpt, "atomic_write", killing_write)
            with pytest.raises(_Killed):
                run(work, tiny_data)
            monkeypatch.setattr(ckpt, "atomic_write", original)
            info = ckpt.checkpoint_info(work)
            state_step = int(np.asarray(ckpt._read_checkpoint(work)[0]["step"])[0])  # the weights' own step
            assert info["iteration"] == state_step and state_step in (4 * save, 4 * (save + 1))
            resumed = run(work, tiny_data, resume=True)
            assert resumed.iteration == 12 and ckpt.checkpoint_info(work)["iteration"] == 12
            for a, b in zip(jax.tree.leaves(resumed.states.params), jax.tree.leaves(full.states.params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert not list((work / "checkpoints").glob(".*.tmp")), (write, phase)


def test_a_diverging_run_stops_with_the_model_and_iteration_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    import dataclasses

    from bang_jax.checkpoint import checkpoint_info
    from bang_jax.train import TrainingDiverged

    wild = dataclasses.replace(LENET_SOLVER, base_lr=1e4)
    with pytest.raises(TrainingDiverged, match=r"model R0 diverged: its training loss is nan at iteration \d+"):
        run(tmp_path / "wild", tiny_data, config=TrainConfig(solver=wild, steps=12, batch_size=16))
    info = checkpoint_info(tmp_path / "wild")
    assert info is None or info["iteration"] < 12  # no checkpoint of NaN weights


def test_model_health_marks_models_whose_numbers_mean_nothing(tiny_data):
    from bang_jax.evaluate import evaluate_model, model_health

    images, labels = tiny_data
    model = LeNet()
    variables = model.init(jax.random.PRNGKey(0), images[:1].astype(np.float32))
    x = images.astype(np.float32)
    guess = model_health(model, variables, x, labels)  # an untrained LeNet guesses
    assert guess["status"] == "no better than chance" and "chance 10.0%" in guess["status_detail"]
    row = evaluate_model(model, variables, x, labels, attacks=("fgs",))
    assert row["status"] == "no better than chance" and "fgs_rate" not in row


def test_augmentation_is_seeded_by_iteration_and_resumes_bit_identically(tmp_path, tiny_data):
    """Random crops and flips: a real change of the batch, the same for the same (data seed, iteration), and a run
    stopped and resumed ends with the weights of an uninterrupted one."""
    from bang_jax.data import augment_batch

    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
    key = jax.random.PRNGKey(3)
    a = augment_batch(x, key, kind="crop", pad=2)
    assert a.shape == x.shape and not np.array_equal(a, x)
    np.testing.assert_array_equal(a, augment_batch(x, key, kind="crop", pad=2))
    # every output is a window of the zero-padded image
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(2):
        assert any(np.array_equal(a[i], padded[i, r:r + 6, c:c + 6]) for r in range(5) for c in range(5))
    flips = [augment_batch(x, jax.random.PRNGKey(k), kind="crop_flip", pad=0) for k in range(8)]
    assert any(np.array_equal(f[0], x[0, :, ::-1]) for f in flips) and any(np.array_equal(f[0], x[0]) for f in flips)
    np.testing.assert_array_equal(augment_batch(x, key, kind="none"), x)
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(solver=LENET_SOLVER, steps=4, batch_size=8, augment="rotate")

    cfg = TrainConfig(solver=LENET_SOLVER, steps=12, batch_size=8, augment="crop_flip", augment_pad=3)
    models = [ModelSpec(name="R0", seed=0), ModelSpec(name="B", seed=1, bang=BangConfig(epsilon=0.8))]
    whole = train(LeNet(), tiny_data, models, cfg, tmp_path / "whole", [], progress=False)
    train(LeNet(), tiny_data, models, cfg, tmp_path / "split", [Checkpoint(6), StopAfter(6)], progress=False)
    resumed = train(LeNet(), tiny_data, models, cfg, tmp_path / "split", [Checkpoint(6, resume=True)],
                    progress=False)
    plain = train(LeNet(), tiny_data, models, dataclasses.replace(cfg, augment="none"), tmp_path / "plain", [],
                  progress=False)
    for w, r, p in zip(whole.variables, resumed.variables, plain.variables):
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(r)):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, c) for a, c in zip(jax.tree.leaves(w), jax.tree.leaves(p)))
