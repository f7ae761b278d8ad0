"""The examples run, offline, and learn: each is run in-process for a few steps and its quality checked.

Quality is measured against references the examples compute independently of fnlit (the least-squares
fit, PCA, predicting the mean image, a bag-of-words classifier, chance) or against fixed thresholds.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("sklearn")  # the examples' data ships inside scikit-learn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def load(name: str) -> ModuleType:
    """Imports examples/<name>.py (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fnlit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    # Small models on a shared 2-core machine: one intra-op thread is faster than two fighting for cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def python_blocks(markdown: Path, after_heading: str) -> list[str]:
    """The ```python blocks of a markdown file's section that starts with the heading ``after_heading``."""
    text = markdown.read_text()
    section = text.split(after_heading, 1)[1]
    section = re.split(r"\n#{1,3} ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


# ---------------------------------------------------------------------------------------------- digits
def test_digits_bf16_reaches_95_percent_and_logs(tmp_path):
    digits = load("digits")
    result = digits.main(["--amp", "bf16", "--width", "8", "--epochs", "10", "--log-dir", str(tmp_path), "--no-progress"])
    assert result["acc"] >= 0.95
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event file"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(header)


def test_digits_fp32_with_accumulation_learns():
    result = load("digits").main(["--epochs", "5", "--accumulate", "2", "--log-dir", "", "--no-progress"])
    assert result["acc"] >= 0.9


# ------------------------------------------------------------------------------------------ regression
def test_regression_reaches_noise_floor_and_recovers_coefficients():
    result = load("regression").main(["--log-dir", ""])
    assert result["test_mse"] < 1.25 * result["noise_floor"]
    assert result["test_mse"] == pytest.approx(result["lstsq_test_mse"], rel=0.05)
    assert result["coef_error"] < 0.02  # the true coefficients are recovered
    assert result["coef_vs_lstsq"] < 0.01


def test_regression_on_diabetes_matches_least_squares():
    result = load("regression").main(["--data", "diabetes", "--log-dir", ""])
    assert result["test_mse"] == pytest.approx(result["lstsq_test_mse"], rel=0.05)


# --------------------------------------------------------------------------------- accumulate + amp
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_accumulate_amp_clip_learns(amp):
    result = load("accumulate_amp").main(["--amp", amp, "--accumulate", "4", "--clip", "0.5", "--epochs", "6", "--log-dir", ""])
    assert result["test_acc"] >= 0.85
    assert result["skipped_steps"] == 0  # float16 with a dynamic loss scale: no overflow on this model


# ------------------------------------------------------------------------------------ text classifier
def test_text_classifier_beats_chance_and_bag_of_words():
    tc = load("text_classifier")
    result = tc.main(["--dim", "32", "--max-steps", "150", "--lr", "5e-3", "--train-size", "2000", "--log-dir", ""])
    assert result["test_acc"] >= 0.75  # chance is 0.5
    assert result["test_acc"] > result["bag_of_words_acc"] + 0.1  # word order matters, and it was learned


def test_text_classifier_test_and_validation_reviews_are_never_training_ones():
    # Independent draws of the small grammar repeated ~20% of the training texts in the test set word for word
    # (memorised: 0.976 accuracy on those vs 0.854 on unseen ones), though the example said none were seen.
    tc = load("text_classifier")
    train, val, test = tc.splits(2000, 0, tc.vocabulary())
    seen = set(train[2])
    assert (len(val[2]), len(test[2])) == (500, 1000)
    assert not seen & set(val[2]) and not seen & set(test[2]) and not set(val[2]) & set(test[2])
    assert [tc.sentiment(t) for t in test[2]] == test[1].tolist()  # labels still follow their texts


def test_text_classifier_labels_depend_on_word_order():
    tc = load("text_classifier")
    neg, pos = "the film was not good but the plot was bad", "the film was good but the plot was not bad"
    assert sorted(neg.split()) == sorted(pos.split())  # the same words, opposite labels
    assert (tc.sentiment(neg), tc.sentiment(pos)) == (0, 1)
    assert tc.sentiment("i can not lie , the cast was fun") == 1  # a "not" elsewhere does not negate


def test_text_classifier_hugging_face_model_builds_offline(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from a config only: any download attempt would fail
    result = load("text_classifier").main(["--model", "hf", "--dim", "32", "--max-steps", "5", "--train-size", "320", "--log-dir", ""])
    assert 0.0 <= result["test_acc"] <= 1.0


def test_text_classifier_without_transformers_exits_with_a_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SystemExit):
        load("text_classifier").main(["--model", "hf"])
    assert "pip install transformers" in capsys.readouterr().err



@pytest.mark.parametrize("name, args", [
    ("digits", ["--epochs", "0"]), ("digits", ["--batch-size", "5000"]), ("accumulate_amp", ["--batch-size", "2000"]),
    ("data_parallel", ["--batch-size", "2048"]), ("text_classifier", ["--train-size", "50"]),
    ("autoencoder", ["--epochs", "0"]), ("regression", ["--epochs", "0"]), ("from_lightning", ["--epochs", "0"]),
])  # fmt: skip
def test_settings_that_leave_no_training_step_say_so(name, args, capsys, tmp_path):
    # They failed building the LR schedule from 0 steps: "warmup_cosine expected warmup_steps >= 0, got -1".
    with pytest.raises(SystemExit):
        load(name).main(args + ["--log-dir", ""] + (["--ckpt-dir", str(tmp_path)] if name == "from_lightning" else []))
    err = capsys.readouterr().err
    assert "no training step to take" in err
    # the advice names options the example has (from_lightning's told to use a --batch-size it does not take)
    advice = err.split("no training step to take", 1)[1]
    options = set(re.findall(r'add_argument\("(--[a-z-]+)"', (EXAMPLES / f"{name}.py").read_text()))
    assert set(re.findall(r"--[a-z-]+", advice)) <= options, (advice, options)


# ----------------------------------------------------------------------------------------- autoencoder
def test_autoencoder_reconstructs_and_loads_from_checkpoint(tmp_path, capsys):
    result = load("autoencoder").main(["--epochs", "15", "--ckpt-dir", str(tmp_path), "--log-dir", ""])
    assert result["test_mse"] < 0.4 * result["mean_image_mse"]  # far better than predicting the mean image
    assert result["test_mse"] < result["pca_mse"]  # and better than the best linear code of the same size
    assert (tmp_path / "last.ckpt").exists()
    assert "shape (4, 8)" in capsys.readouterr().out  # the embeddings of 4 images


# ------------------------------------------------------------------------------------------- data parallel
def test_data_parallel_runs_as_one_process():
    result = load("data_parallel").main(["--epochs", "4", "--log-dir", ""])
    assert result["world_size"] == 1 and result["test_acc"] >= 0.85


@pytest.mark.distributed
def test_data_parallel_under_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES / "data_parallel.py"), "--epochs", "4", "--log-dir", str(tmp_path / "runs")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("test accuracy")]
    assert len(lines) == 1, out.stdout  # rank 0 prints, rank 1 does not
    assert "2 process(es)" in lines[0] and "identical on every rank: True" in lines[0]
    assert float(lines[0].split()[2]) >= 0.85
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))  # rank 0 logged


# ------------------------------------------------------------------------------------ hyperparameter search
def test_hparam_search_trials_are_pure_and_ensemble_matches_grid():
    hs = load("hparam_search")
    result = hs.main(["--lrs", "1e-3", "1e-2", "--weight-decays", "0", "0.5", "--epochs", "3"])
    assert result["trials"] == 4 and result["lr"] == 1e-2 and result["val_acc"] >= 0.9
    configs = [hs.Config(lr, wd, epochs=2) for lr, wd in [(1e-3, 0.0), (1e-2, 0.5)]]
    grid = [hs.trial(c) for c in configs]
    assert hs.trial(configs[0]) == grid[0]  # a pure function of its config: same config, same metrics
    for solo, member in zip(grid, hs.ensemble_sweep(configs)):
        assert member["val_loss"] == pytest.approx(solo["val_loss"], rel=1e-4)
        assert member["val_acc"] == pytest.approx(solo["val_acc"], abs=1e-6)


def test_hparam_search_with_optuna():
    pytest.importorskip("optuna")
    result = load("hparam_search").main(["--search", "optuna", "--trials", "3", "--epochs", "1"])
    assert result["trials"] == 3


# ------------------------------------------------------------------------- from Lightning, and the docs
def test_from_lightning_trains_tests_and_resumes(tmp_path):
    fl = load("from_lightning")
    argv = ["--epochs", "4", "--ckpt-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "runs")]
    first = fl.main(argv)
    assert first["acc"] >= 0.85 and first["best_test_acc"] >= 0.85
    again = fl.main(argv)  # resumes from last.ckpt: the 4 epochs are done, so nothing more is trained
    assert again["steps"] == first["steps"] and again["acc"] == first["acc"]


def test_lightning_doc_shows_the_example_code():
    doc = ROOT / "docs" / "lightning.md"
    code = {line.strip() for line in (EXAMPLES / "from_lightning.py").read_text().splitlines()}
    (block,) = python_blocks(doc, "### fnlit")
    missing = [line for line in block.splitlines() if line.strip() and line.strip() not in code]
    assert not missing, f"docs/lightning.md's fnlit code differs from examples/from_lightning.py: {missing}"


def test_readme_twenty_lines_and_unit_test_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example logs to runs/quick
    readme = ROOT / "README.md"
    (twenty,) = python_blocks(readme, "## Twenty lines")
    assert len(twenty.strip().splitlines()) <= 22
    namespace: dict = {}
    exec(compile(twenty, "README.md: Twenty lines", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert int(namespace["state"].step) == 24
    assert list((tmp_path / "runs" / "quick").glob("events.out.tfevents.*"))
    (unit_test,) = python_blocks(readme, "## Unit-testing a training step")
    exec(compile(unit_test, "README.md: Unit-testing", "exec"), namespace)  # noqa: S102
    namespace["test_train_step"]()


@pytest.mark.parametrize("name, argv", [
    ("digits", ["--max-steps", "1", "--no-progress"]), ("regression", ["--epochs", "1"]),
    ("autoencoder", ["--epochs", "1"]), ("data_parallel", ["--max-steps", "1"]),
    ("accumulate_amp", ["--epochs", "1"]), ("text_classifier", ["--max-steps", "1", "--train-size", "64", "--dim", "8"]),
])  # fmt: skip
def test_examples_run_their_shortest_setting(tmp_path, name, argv):
    # One epoch or one step: the warmup must fit inside the schedule (it was as long as the whole run).
    extra = ["--ckpt-dir", str(tmp_path)] if name == "autoencoder" else []
    assert load(name).main([*argv, *extra, "--log-dir", ""]) is not None
