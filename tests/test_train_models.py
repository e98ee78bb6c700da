"""train() and the experiments on models other than the bundled ones: NNX models, BatchNorm, your own optimiser
and loss, a model given by import path on the command line."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bang_jax
import bang_jax.nnx
from bang_jax import BangConfig
from bang_jax.checkpoint import load_snapshot
from bang_jax.evaluate import evaluate_model
from bang_jax.solvers import SolverConfig, caffe_sgd
from bang_jax.train import (
    Checkpoint,
    ModelSpec,
    Snapshots,
    StopAfter,
    TrainConfig,
    init_states,
    snapshot_tree,
    snapshot_variables,
    train,
)

SOLVER = SolverConfig(base_lr=0.05, momentum=0.9, weight_decay=1e-4)
MODELS = [ModelSpec(name="R0", seed=1), ModelSpec(name="B", seed=2, bang=BangConfig(epsilon=0.8, beta=1.2))]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    images = (rng.uniform(0, 80, (64, 28, 28, 1)) + labels[:, None, None, None] * 17).astype(np.uint8)
    return images, labels


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1) / 255.0
        x = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(10, name="out")(x)


class NNXMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(784, 16, rngs=rngs)
        self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1) / 255.0)))


def test_an_nnx_model_trains_exactly_like_the_same_linen_model(data):
    """Same weights, same BANG step: the NNX path of train() gives the linen path's weights (an analytic twin)."""
    cfg = TrainConfig(solver=SOLVER, steps=5, batch_size=16)
    lin = train(LinenMLP(), data, MODELS, cfg, progress=False, mesh=None)

    def factory(*, rngs):  # the NNX twin starts from the linen model's initial weights for the same seed
        key = jax.random.key_data(rngs.default.key[...])
        start = LinenMLP().init(key, jnp.zeros((1, 28, 28, 1)))["params"]
        m = NNXMLP(rngs=nnx.Rngs(0))
        for layer in ("hidden", "out"):
            getattr(m, layer).kernel.set_value(start[layer]["kernel"])
            getattr(m, layer).bias.set_value(start[layer]["bias"])
        return m

    nx = train(factory, data, MODELS, cfg, progress=False, mesh=None)
    for a, b in zip(lin.variables, nx.variables):
        for layer in ("hidden", "out"):
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(a["params"][layer][leaf], b["params"][layer][leaf], rtol=2e-5, atol=2e-6)
    assert not np.allclose(lin.variables[0]["params"]["out"]["kernel"], lin.variables[1]["params"]["out"]["kernel"])


def test_nnx_batchnorm_training_equals_a_hand_written_nnx_loop(data):
    """train() with an NNX BatchNorm model = nnx.Optimizer + bang_jax.nnx.bang_grad by hand (dropout off)."""
    from user_models import NNXNet  # noqa: PLC0415

    class NoDrop(NNXNet):
        def __init__(self, *, rngs):
            super().__init__(1, rngs=rngs)
            self.drop = nnx.Dropout(0.0, rngs=rngs)

    images, labels = data
    cfg = TrainConfig(solver=SOLVER, steps=4, batch_size=16)
    spec = ModelSpec(name="B", seed=5, bang=BangConfig(epsilon=0.8))
    res = train(NoDrop, data, [spec], cfg, progress=False, mesh=None)

    model = NoDrop(rngs=nnx.Rngs(jax.random.PRNGKey(5)))
    model.train()
    opt = nnx.Optimizer(model, caffe_sgd(0.05, 0.9, 1e-4), wrt=nnx.Param)
    for it in range(4):
        idx = np.arange(it * 16, it * 16 + 16) % len(images)
        grads = bang_jax.nnx.bang_grad(model, jnp.asarray(images[idx], jnp.float32), labels[idx], epsilon=0.8)
        opt.update(model, grads)
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = res.variables[0]["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.variables[0]["state"], stats)
    assert float(jnp.abs(res.variables[0]["state"]["bn"]["mean"]).sum()) > 0  # the statistics moved


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_batchnorm_models_resume_bit_identically_and_evaluate(tmp_path, data, kind):
    from user_models import make_linen, make_nnx  # noqa: PLC0415

    model = make_linen() if kind == "linen" else make_nnx
    cfg = TrainConfig(solver=SOLVER, steps=8, batch_size=16, augment="crop")

    def run(out, stop=None):
        callbacks = [Checkpoint(2, resume=True), Snapshots(every=4)] + ([StopAfter(stop)] if stop else [])
        return train(model, data, MODELS, cfg, out, callbacks, progress=False)

    full = run(tmp_path / "full")
    # A snapshot holds the statistics too (the noise study evaluates snapshots).
    template, consts = init_states(model, data[0], MODELS, cfg)
    snap = load_snapshot(tmp_path / "full", 8, snapshot_tree(template))
    jax.tree.map(np.testing.assert_array_equal, snapshot_variables(snap, 1, consts, template), full.variables[1])
    run(tmp_path / "cut", stop=3)
    resumed = run(tmp_path / "cut")
    stats = "batch_stats" if kind == "linen" else "state"
    for a, b in zip(full.variables, resumed.variables):
        assert set(a) >= {"params", stats}
        jax.tree.map(np.testing.assert_array_equal, a, b)
    fn = bang_jax.train.as_trainable(model)
    x, y = data[0][:32], data[1][:32]
    row = evaluate_model(fn, full.variables[1], x, y, attacks=("fgs",), progress=False)
    logits = fn.apply(full.variables[1], jnp.asarray(x, jnp.float32), train=False)  # running statistics
    assert row["accuracy"] == pytest.approx(100 * np.mean(np.argmax(logits, -1) == y)) and row["test_images"] == 32


def test_own_optimizer_and_loss_are_used(data):
    """optimizer= and loss_fn= replace the Caffe solver and the cross-entropy: compared with a hand-written loop."""
    images, labels = data
    tx = optax.sgd(optax.cosine_decay_schedule(0.1, 3), momentum=0.9, nesterov=True)

    def loss_fn(logits, y):  # label smoothing, per example
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1))

    cfg = TrainConfig(solver=None, steps=3, batch_size=16)
    spec = ModelSpec(name="B", seed=3, bang=BangConfig(epsilon=0.7))
    res = train(LinenMLP(), data, [spec], cfg, progress=False, mesh=None, optimizer=tx, loss_fn=loss_fn)
    model = LinenMLP()
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)))["params"]
    state = tx.init(params)
    for it in range(3):
        idx = np.arange(it * 16, it * 16 + 16)
        g = bang_jax.bang_grad(model.apply, {"params": params}, jnp.asarray(images[idx], jnp.float32), labels[idx],
                               epsilon=0.7, loss_fn=loss_fn, train=True)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.variables[0]["params"],
                 params)
    with pytest.raises(ValueError, match="optimizer="):
        train(LinenMLP(), data, [spec], cfg, progress=False)
    with pytest.raises(ValueError, match="per_example"):
        train(NNXMLP, data, [spec], TrainConfig(solver=SOLVER, steps=1, batch_size=8, method="per_example"),
              progress=False)
    with pytest.raises(TypeError, match="rngs="):
        train(lambda: NNXMLP(rngs=nnx.Rngs(0)), data, [spec], TrainConfig(solver=SOLVER, steps=1, batch_size=8),
              progress=False)


def test_cosine_nesterov_solver():
    s = SolverConfig(base_lr=0.1, policy="cosine", decay_steps=100, nesterov=True)
    sched = s.schedule()
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(50)) == pytest.approx(0.05)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-9) and float(sched(500)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="decay_steps"):
        SolverConfig(base_lr=0.1, policy="cosine")


# ------------------------------------------------------------------------------------------------------------
# --model package.module:function in the experiments.


def test_user_models_by_import_path_end_to_end(tmp_path):
    """A linen and an NNX model (both with BatchNorm) given by import path: trained regular and BANG, resumed,
    evaluated with the paper's attacks, PGD, Square and the curves, tables written."""
    from experiments import mnist

    common = ["--preset", "smoke", "--no-progress", "--steps", "12", "--log-every", "6", "--checkpoint-every", "6",
              "--test-limit", "60", "--noise-every", "0", "--figure-images", "2", "--hc1-max-step", "32"]
    out = tmp_path / "nnx"
    rows = mnist.main([*common, "--out", str(out), "--model", "user_models:make_nnx", "--steps", "6",
                       "--stages", "train"])
    assert rows is None or rows == []
    rows = mnist.main([*common, "--out", str(out), "--model", "user_models:make_nnx", "--resume",
                       "--attacks", "fgs,hc1,pgd,square", "--pgd-eps", "32", "--eval.pgd-steps", "3",
                       "--eval.square-budgets", "32", "--square-queries", "5", "--curve-eps", "16,64"])
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "user_models:make_nnx"
    assert {r["id"] for r in rows} == {"R0", "B1"}
    for r in rows:
        assert r["iteration"] == 12 and r["curves"] and r["fgs_rate"] is not None and "pgd" in json.dumps(r)
    names = {p.name for p in out.iterdir()}
    assert {"table1.md", "results.json", "fig1_hc1.png", "curves.png"} <= names, names
    table = (out / "table1.md").read_text()
    assert "# user_models:make_nnx on mnist" in table and "| paper |" not in table  # not the paper's network

    rows = mnist.main([*common, "--out", str(tmp_path / "linen"), "--model", "user_models:make_linen",
                       "--attacks", "fgs"])
    assert len(rows) == 2 and all(r["status"] == "ok" if "status" in r else True for r in rows)


@pytest.mark.parametrize("target, message", [
    ("user_models:make_nnx --method per_example", "not available for the NNX model"),
    ("user_models:make_linen --method per_example", "a training step (per_example) fails"),
        ("user_models:wrong_output", "[N, 10] logits"),
    ("user_models:not_a_model", "not a flax.linen Module"),
    ("user_models:no_train_argument", "must take train="),
    ("user_models:nothing", "has no attribute"),
    ("no_such_package.mod:fn", "cannot import"),
    ("not-a-path", "package.module:function"),
    ("user_models:make_nnx_cifar", "calling it on"),
])
def test_bad_user_models_are_named_before_any_work(tmp_path, target, message, capsys):
    from experiments import mnist

    with pytest.raises(SystemExit) as exc:
        mnist.main(["--preset", "smoke", "--no-progress", "--out", str(tmp_path / "x"), "--model", *target.split()])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_the_bundled_preact_resnet_builds_checks_its_input_and_trains_with_bang():
    from bang_jax import models
    from bang_jax.resnet import PreActResNet

    net, variables = models.build("preact_resnet8")
    assert set(variables) == {"params", "state"} and models.get("preact_resnet8") is net
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 77_850
    with pytest.raises(ValueError, match="6n \\+ 2"):
        PreActResNet(depth=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="32, 32, 3"):
        net.apply(variables, jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(1)
    data = (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16))
    cfg = TrainConfig(solver=SolverConfig(base_lr=0.05, policy="cosine", decay_steps=2, nesterov=True), steps=2,
                      batch_size=8, augment="crop_flip")
    res = train(net, data, [ModelSpec(name="B", bang=BangConfig(epsilon=0.8, beta=1.1, ratio=0.5))], cfg,
                progress=False, mesh=None)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), res.variables[0]["params"],
                         variables["params"])
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained (BatchNorm scales and offsets too)


def test_a_checkpoint_written_before_train_states_carried_model_state_still_resumes(tmp_path, data):
    from flax import serialization

    from bang_jax.checkpoint import STATE

    cfg = TrainConfig(solver=SOLVER, steps=6, batch_size=16)
    full = train(LinenMLP(), data, MODELS, cfg, tmp_path / "full", [Checkpoint(3)], progress=False)
    train(LinenMLP(), data, MODELS, cfg, tmp_path / "old", [Checkpoint(3), StopAfter(3)], progress=False)
    path = tmp_path / "old" / STATE
    raw = serialization.msgpack_restore(path.read_bytes())
    del raw["state"]["model_state"]  # the layout of earlier versions, and their description without the solver
    info = json.loads(raw["info"])   # fields added since
    for key in ("nesterov", "decay_steps"):
        del info["config"]["solver"][key]
    raw["info"] = json.dumps(info)
    path.write_bytes(serialization.msgpack_serialize(raw))
    resumed = train(LinenMLP(), data, MODELS, cfg, tmp_path / "old", [Checkpoint(3, resume=True)], progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed.variables, full.variables)


@pytest.mark.filterwarnings("ignore:Using 'Module.sow:DeprecationWarning")  # older NNX code sows like this
def test_models_the_evaluation_must_call_alike(data):
    """A linen model whose train= has no default, an NNX model that sows intermediates, and variables that lack
    the BatchNorm statistics (refused, not filled in from the initialisation)."""
    from user_models import make_nnx  # noqa: PLC0415

    class RequiredTrain(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(10)(nn.Dropout(0.1, deterministic=not train)(x.reshape(x.shape[0], -1) / 255.0))

    images, labels = data
    cfg = TrainConfig(solver=SOLVER, steps=2, batch_size=16)
    res = train(RequiredTrain(), data, MODELS[1:], cfg, progress=False, mesh=None)
    row = evaluate_model(RequiredTrain(), res.variables[0], images[:16], labels[:16], attacks=("fgs",), progress=False)
    assert row["test_images"] == 16

    class Sows(NNXMLP):
        def __call__(self, x):
            h = nnx.relu(self.hidden(x.reshape(x.shape[0], -1) / 255.0))
            self.sow(nnx.Intermediate, "features", h)
            return self.out(h)

    res = train(Sows, data, MODELS[1:], cfg, progress=False, mesh=None)
    assert "state" not in res.variables[0]  # what a call adds is not state

    net = bang_jax.train.as_trainable(make_nnx)
    variables = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="lacks bn/mean"):
        net.apply({"params": variables["params"]}, jnp.zeros((1, 28, 28, 1)))


def test_per_layer_values_for_list_indices_survive_json():
    tree = {"blocks": {0: {"kernel": jnp.ones(2)}, 1: {"kernel": jnp.ones(2)}}}
    cfg = BangConfig(epsilon={"blocks": {"0": 0.7, "1": 0.8}})  # as config.json gives them back
    out = cfg.broadcast(tree)
    assert float(out.epsilon["blocks"][1]["kernel"]) == pytest.approx(0.8)
