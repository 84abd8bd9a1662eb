"""The exercise's network and recipe in Keras 3 (TensorFlow, CPU): the baseline cifarlab is compared to.

Runs inside its own virtual environment (bench/.venv-keras, made by bench_training.py); it never imports
cifarlab. Reads the CIFAR-10 binary files with numpy. Prints one JSON line.

    python keras_exercise.py DATA_DIR --steps 300 --repeats 3      # throughput (images/s)
    python keras_exercise.py DATA_DIR --epochs 10                    # the full recipe: test accuracy
    python keras_exercise.py DATA_DIR --mixed-bf16 ...               # Keras's mixed_bfloat16 policy
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402


def read(path):
    rec = np.fromfile(path, np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 0].astype(np.int64)


def load(data_dir):
    parts = [read(os.path.join(data_dir, f"data_batch_{i}.bin")) for i in range(1, 6)]
    x_test, y_test = read(os.path.join(data_dir, "test_batch.bin"))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), x_test, y_test


def make_model(keras):
    from keras import layers

    leaky = lambda: layers.LeakyReLU(negative_slope=0.1)  # noqa: E731
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(16, 3, padding="same"), leaky(),
        layers.Conv2D(32, 3, padding="same"), leaky(),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Conv2D(32, 3, padding="same"), leaky(),
        layers.Conv2D(64, 3, padding="same"), leaky(),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Flatten(), layers.Dense(256), leaky(), layers.Dropout(0.5),
        layers.Dense(10), layers.Activation("softmax", dtype="float32"),  # fp32 softmax under mixed precision
    ])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=0, help="run the full recipe for this many epochs")
    ap.add_argument("--mixed-bf16", action="store_true", help="keras.mixed_precision policy mixed_bfloat16")
    args = ap.parse_args()
    import keras
    import tensorflow as tf

    if args.mixed_bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    framework = f"keras {keras.__version__} / tensorflow {tf.__version__}" + (" mixed_bfloat16" if args.mixed_bf16 else "")

    x_train, y_train, x_test, y_test = load(args.data_dir)
    x_train = x_train.astype("float32") / 255 - 0.5
    x_test = x_test.astype("float32") / 255 - 0.5
    y_train1 = keras.utils.to_categorical(y_train, 10)
    model = make_model(keras)
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.Adamax(5e-3), metrics=["accuracy"])

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    times = []
    if args.epochs:
        sched = keras.callbacks.LearningRateScheduler(lambda e: 5e-3 * 0.9 ** e)
        start = time.perf_counter()
        model.fit(x_train, y_train1, batch_size=32, epochs=args.epochs, shuffle=True, verbose=0,
                  callbacks=[sched, EpochTimer()])
        wall = time.perf_counter() - start
        acc = float((model.predict(x_test, batch_size=1000, verbose=0).argmax(1) == y_test).mean())
        print(json.dumps({"framework": framework,
                          "test_accuracy": acc, "epoch_seconds": times, "wall_seconds": wall,
                          "images_per_s": 50000 / float(np.median(times))}))
        return
    n = 32 * args.steps
    # Epoch 1 warms up (graph tracing); the following epochs are timed.
    model.fit(x_train[:n], y_train1[:n], batch_size=32, epochs=1 + args.repeats, shuffle=True, verbose=0,
              callbacks=[EpochTimer()])
    rates = [n / t for t in times[1:]]
    print(json.dumps({"framework": framework,
                      "images_per_s": float(np.median(rates)), "all": rates}))


if __name__ == "__main__":
    main()
