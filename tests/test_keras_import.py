"""``cifarlab import-keras``: h5 files in Keras 2 and Keras 3 layouts, written here with h5py (no TensorFlow),
must give the logits of the Keras model computed by hand in numpy (NHWC, flatten over H, W, C)."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

h5py = pytest.importorskip("h5py")

from cifarlab import pipeline  # noqa: E402
from cifarlab.checkpoints import load_checkpoint  # noqa: E402
from cifarlab.cli import main  # noqa: E402
from cifarlab.data import CIFAR10  # noqa: E402
from cifarlab.errors import CheckpointError  # noqa: E402
from cifarlab.evaluate import predict_logits  # noqa: E402
from cifarlab.keras_import import import_keras, keras_exercise_declaration  # noqa: E402
from cifarlab.transforms import Normalization  # noqa: E402

TOLERANCE = 1e-4
# The exercise's Keras layers in model order (names as Keras 2 gives them, see the exercise's summary).
KERAS2_LAYERS = ["conv1", "leaky_re_lu_1", "conv2", "leaky_re_lu_2", "max_pool_1", "dropout_1", "conv3",
                 "leaky_re_lu_3", "conv4", "leaky_re_lu_4", "max_pool_2", "dropout_2", "flatten_1", "fc1",
                 "dropout_3", "dense_1", "activation_1"]
# Keras 3 names the groups of a .weights.h5 by layer class, numbered.
KERAS3_NAMES = {"conv1": "conv2d", "conv2": "conv2d_1", "conv3": "conv2d_2", "conv4": "conv2d_3",
                "fc1": "dense", "dense_1": "dense_1"}
SHAPES = {"conv1": (3, 3, 3, 16), "conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 32), "conv4": (3, 3, 32, 64),
          "fc1": (4096, 256), "dense_1": (256, 10)}


def random_keras_weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """He-scaled random kernels (Keras layouts) and small random biases, float32."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in SHAPES.items():
        fan_in = int(np.prod(shape[:-1]))
        kernel = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        weights[name] = [kernel, rng.normal(0, 0.05, shape[-1]).astype(np.float32)]
    return weights


def write_keras2(path, weights, layer_names=KERAS2_LAYERS, prefix=""):
    """What Keras 2's model.save_weights writes: ordered layer_names; weight_names per layer group."""
    with h5py.File(path, "w") as f:
        root = f.create_group(prefix) if prefix else f
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.2.4"
        root.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
        for name in layer_names:
            group = root.create_group(name)
            values = weights.get(name, [])
            names = [f"{name}/kernel:0", f"{name}/bias:0"][:len(values)]
            group.attrs["weight_names"] = np.array([n.encode() for n in names], dtype="S")
            for weight_name, value in zip(names, values):
                group.create_dataset(weight_name, data=value)
    return path


def write_keras3(path, weights, names=KERAS3_NAMES):
    """What Keras 3's model.save_weights('x.weights.h5') writes: layers/<name>/vars/0, 1."""
    with h5py.File(path, "w") as f:
        f.create_group("vars")
        layers = f.create_group("layers")
        for extra in ("leaky_re_lu", "max_pooling2d", "dropout", "flatten"):
            layers.create_group(extra).create_group("vars")
        for torch_name, keras_name in names.items():
            group = layers.create_group(keras_name).create_group("vars")
            for i, value in enumerate(weights[torch_name]):
                group.create_dataset(str(i), data=value)
    return path


# ---------------------------------------------------------------------------------------------------
# The Keras model by hand: NHWC, 'same' 3x3 convolutions, LeakyReLU 0.1, 2x2 max-pool, flatten (H, W, C)


def _conv_same(x, kernel, bias):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = sliding_window_view(padded, (3, 3), axis=(1, 2))  # N H W C kh kw
    return np.einsum("nhwcij,ijcf->nhwf", patches, kernel, optimize=True) + bias


def _leaky(x):
    return np.where(x > 0, x, 0.1 * x)


def _pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def keras_features(images_nchw: np.ndarray, weights) -> np.ndarray:
    """The convolutional part, flattened as Keras does: over (H, W, C)."""
    x = images_nchw.transpose(0, 2, 3, 1).astype(np.float64) / 255.0 - 0.5  # the exercise's normalization
    w = {k: [v.astype(np.float64) for v in vs] for k, vs in weights.items()}
    x = _pool(_leaky(_conv_same(_leaky(_conv_same(x, *w["conv1"])), *w["conv2"])))
    x = _pool(_leaky(_conv_same(_leaky(_conv_same(x, *w["conv3"])), *w["conv4"])))
    return x.reshape(len(x), -1)


def keras_head(features: np.ndarray, weights, fc1_leaky: bool = False) -> np.ndarray:
    w = {k: [v.astype(np.float64) for v in vs] for k, vs in weights.items()}
    x = features @ w["fc1"][0] + w["fc1"][1]
    if fc1_leaky:
        x = _leaky(x)
    return x @ w["dense_1"][0] + w["dense_1"][1]


def keras_logits(images_nchw: np.ndarray, weights, fc1_leaky: bool = False) -> np.ndarray:
    return keras_head(keras_features(images_nchw, weights), weights, fc1_leaky)


def _cifarlab_logits(model, images):
    return predict_logits(model, images, Normalization.named("exercise")).double().numpy()


@pytest.fixture(scope="module")
def weights():
    return random_keras_weights()


@pytest.fixture(scope="module")
def images(cifar):
    return cifar.test.images[:100]


@pytest.fixture(scope="module")
def features(weights, images):
    """Computed once: the numpy convolutions are the slow part of these tests."""
    return keras_features(images.numpy(), weights)


# ---------------------------------------------------------------------------------------------------
# Same logits as Keras


@pytest.mark.parametrize("layout", ["keras2", "keras2_full_model", "keras3", "keras3_archive"])
def test_imported_logits_equal_hand_computed_keras_logits(tmp_path, weights, images, features, layout):
    if layout == "keras2":
        path = write_keras2(tmp_path / "weights.h5", weights)
    elif layout == "keras2_full_model":  # model.save("model.h5") keeps the same under model_weights
        path = write_keras2(tmp_path / "model.h5", weights, prefix="model_weights")
    elif layout == "keras3":
        path = write_keras3(tmp_path / "model.weights.h5", weights)
    else:
        write_keras3(tmp_path / "model.weights.h5", weights)
        path = tmp_path / "model.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
            archive.write(tmp_path / "model.weights.h5", "model.weights.h5")
    model, meta = import_keras(path)
    expected = keras_head(features, weights)
    got = _cifarlab_logits(model, images)
    diff = float(np.abs(got - expected).max())
    print(f"\n{layout}: max |imported - hand-computed Keras logit| = {diff:.3g} "
          f"(logits up to {np.abs(expected).max():.3g})")
    assert diff < TOLERANCE
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert meta["architecture"]["name"] == "keras-exercise"
    assert sorted(meta["source"]["layers"]) == sorted(SHAPES)


def test_fc1_leaky_relu_variant_is_the_builtin_exercise(tmp_path, weights, images, features):
    path = write_keras2(tmp_path / "weights.h5", weights)
    model, meta = import_keras(path, fc1_activation="leaky_relu")
    assert meta["architecture"]["name"] == "exercise"
    expected = keras_head(features, weights, fc1_leaky=True)
    assert np.abs(_cifarlab_logits(model, images) - expected).max() < TOLERANCE
    # ...and the default (no activation) is measurably different from it on the same weights.
    default_model, _ = import_keras(path)
    assert np.abs(_cifarlab_logits(default_model, images) - expected).max() > 1e-2


def test_keras_exercise_declaration_differs_only_by_the_fc1_activation():
    keras = keras_exercise_declaration()
    builtin = keras_exercise_declaration("leaky_relu")
    assert [layer["name"] for layer in builtin["layers"] if layer not in keras["layers"]] == ["leaky_re_lu_5"]
    assert len(keras["layers"]) == len(builtin["layers"]) - 1


def test_layer_order_and_names_do_not_matter(tmp_path, weights, images, features):
    """Keras names layers itself when the code does not: match by shapes, in any file order."""
    names = {"conv1": "zz_c", "conv2": "a_c", "conv3": "m_c", "conv4": "b_c", "fc1": "y_d", "dense_1": "c_d"}
    path = write_keras3(tmp_path / "w.weights.h5", weights, names)
    model, meta = import_keras(path)
    assert meta["source"]["layers"] == {"conv1": "layers/zz_c", "conv2": "layers/a_c", "conv3": "layers/m_c",
                                        "conv4": "layers/b_c", "fc1": "layers/y_d", "dense_1": "layers/c_d"}
    assert np.abs(_cifarlab_logits(model, images) - keras_head(features, weights)).max() < TOLERANCE


# ---------------------------------------------------------------------------------------------------
# CLI, checkpoint, evaluation


def test_cli_import_then_evaluate(tmp_path, weights, cifar, capsys):
    path = write_keras2(tmp_path / "weights.h5", weights)
    out = tmp_path / "imported"
    assert main(["import-keras", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Total params: 1,084,234" in printed and "fc1 <- fc1" in printed
    ckpt = load_checkpoint(out)
    assert ckpt.meta["classes"] == list(cifar.classes)
    assert ckpt.meta["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [1.0, 1.0, 1.0]}
    assert ckpt.meta["history"] == [] and ckpt.meta["source"]["layout"] == "Keras 2 h5"
    small = CIFAR10(train=cifar.train.subset(slice(0, 10)), test=cifar.test.subset(slice(0, 1000)),
                    classes=cifar.classes, root=cifar.root)
    ev, files = pipeline.evaluate_to_folder(ckpt, small, tmp_path / "eval")
    results = json.loads(open(files["results"]).read())
    assert results["num_images"] == 1000 and results["architecture"] == "keras-exercise"
    expected = _cifarlab_logits(ckpt.model, small.test.images).argmax(1)  # import itself is checked above
    assert results["accuracy"] == pytest.approx(float((expected == small.test.labels.numpy()).mean()))
    # A second import into the same folder needs --force.
    assert main(["import-keras", str(path), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import-keras", str(path), "--out", str(out), "--force"]) == 0


def test_round_trip_of_a_trained_checkpoint(trained_run, tmp_path, cifar):
    """Trained cifarlab weights written out as Keras would hold them, imported back: same predictions."""
    original = load_checkpoint(trained_run)
    state = {k: v.double().numpy() for k, v in original.model.state_dict().items()}
    keras = {}
    for name in ("conv1", "conv2", "conv3", "conv4"):
        keras[name] = [state[f"{name}.weight"].transpose(2, 3, 1, 0), state[f"{name}.bias"]]
    fc1 = state["fc1.weight"].reshape(256, 64, 8, 8).transpose(2, 3, 1, 0).reshape(4096, 256)  # rows (h, w, c)
    keras["fc1"] = [fc1, state["fc1.bias"]]
    keras["dense_1"] = [state["dense_1.weight"].T, state["dense_1.bias"]]
    keras = {k: [np.ascontiguousarray(v, dtype=np.float32) for v in vs] for k, vs in keras.items()}
    path = write_keras2(tmp_path / "trained.h5", keras)
    model, _ = import_keras(path, fc1_activation="leaky_relu")  # trained_run is the built-in 'exercise'
    images = cifar.test.images[:500]
    before, after = _cifarlab_logits(original.model, images), _cifarlab_logits(model, images)
    assert np.abs(before - after).max() < 1e-5
    assert (before.argmax(1) == cifar.test.labels[:500].numpy()).mean() > 0.2  # a real, trained model


# ---------------------------------------------------------------------------------------------------
# Files of another architecture, or not Keras weights at all


def _refused(path, *fragments, **kwargs):
    with pytest.raises(CheckpointError) as info:
        import_keras(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_layer(tmp_path, weights):
    partial = {k: v for k, v in weights.items() if k != "fc1"}
    _refused(write_keras2(tmp_path / "w.h5", partial), "holds 5 layers with weights", "has 6")


def test_extra_layer(tmp_path, weights):
    extra = dict(weights, bn=[np.ones(16, np.float32), np.zeros(16, np.float32)])
    _refused(write_keras2(tmp_path / "w.h5", extra, KERAS2_LAYERS[:1] + ["bn"] + KERAS2_LAYERS[1:]),
             "holds 7 layers with weights")


def test_wrong_shapes(tmp_path, weights):
    other = dict(weights, conv1=[np.zeros((5, 5, 3, 16), np.float32), np.zeros(16, np.float32)])
    _refused(write_keras2(tmp_path / "w.h5", other), "no layer with a kernel (3, 3, 3, 16) and bias (16,) for 'conv1'",
             "conv1 (5, 5, 3, 16) (16,)")
    wider = dict(weights, dense_1=[np.zeros((256, 100), np.float32), np.zeros(100, np.float32)])
    _refused(write_keras3(tmp_path / "w.weights.h5", wider), "for 'dense_1'")


def test_transposed_dense_kernel_is_not_accepted(tmp_path, weights):
    flipped = dict(weights, fc1=[weights["fc1"][0].T.copy(), weights["fc1"][1]])
    _refused(write_keras2(tmp_path / "w.h5", flipped), "for 'fc1'")


def test_not_hdf5(tmp_path):
    (tmp_path / "w.h5").write_text("not hdf5")
    _refused(tmp_path / "w.h5", "not a readable HDF5 file")
    _refused(tmp_path / "missing.h5", "no such file")


def test_hdf5_but_not_keras(tmp_path):
    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.create_dataset("data", data=np.zeros(3))
    _refused(tmp_path / "w.h5", "not Keras weights")


def test_keras_archive_without_weights(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    _refused(tmp_path / "m.keras", "without model.weights.h5")


def test_external_link_is_not_followed(tmp_path, weights):
    write_keras2(tmp_path / "other.h5", weights)
    path = write_keras3(tmp_path / "w.weights.h5", weights)
    with h5py.File(path, "a") as f:
        del f["layers/conv2d/vars/0"]
        f["layers/conv2d/vars/0"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/conv1/conv1/kernel:0")
    _refused(path, "ExternalLink", "refusing to follow it")


def test_bad_values(tmp_path, weights):
    nan = dict(weights, conv2=[np.full((3, 3, 16, 32), np.nan, np.float32), weights["conv2"][1]])
    _refused(write_keras2(tmp_path / "nan.h5", nan), "layer 'conv2' holds NaN or infinite weights")
    ints = dict(weights, conv2=[np.zeros((3, 3, 16, 32), np.int32), weights["conv2"][1]])
    _refused(write_keras2(tmp_path / "int.h5", ints), "int32 weights; expected floats")


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "w.h5").write_text("nope")
    assert main(["import-keras", str(tmp_path / "w.h5"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not (tmp_path / "o").exists()
