"""Logs read back: TensorBoard event files (parsed here, record by record), CSV, JSONL; the progress bar in a pty."""

import contextlib
import csv
import fcntl
import gc
import json
import os
import pathlib
import pty
import struct
import termios
import threading
import time
import tracemalloc
import warnings

import pytest
import torch
from tensorboardX.proto import event_pb2, plugin_hparams_pb2
from tensorboardX.record_writer import masked_crc32c

import fnlit
from fnlit.loop import fit
from fnlit.summary import CSVWriter, JSONLWriter, Logger, MetricBuffer, TensorBoardWriter


def read_events(log_dir):
    """Every Event in the TFRecord files of ``log_dir`` (8-byte length, 4-byte crc, payload, 4-byte crc)."""
    events = []
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        data = pathlib.Path(log_dir, name).read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            payload = data[i + 12 : i + 12 + length]
            # TFRecord framing, checked with tensorboardX's masked CRC-32C (what TensorBoard verifies too).
            assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(data[i : i + 8])
            assert struct.unpack("<I", data[i + 12 + length : i + 16 + length])[0] == masked_crc32c(payload)
            ev = event_pb2.Event()
            ev.ParseFromString(payload)
            events.append(ev)
            i += 12 + length + 4
    return events


def scalars(log_dir):
    out = {}
    for ev in read_events(log_dir):
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def counting_fit(log_dir, **kw):
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    data = [torch.tensor([float(i)]) for i in range(10)]
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean(), "double": 2 * b.mean()})  # noqa: E731
    kw.setdefault("log_every_n_steps", 4)
    return fit(step, state, data, max_epochs=2, val_data=[torch.tensor([1.0, 2.0])],
               eval_step=lambda s, b: {"acc": b.mean()}, progress=False, log_dir=str(log_dir), **kw)  # fmt: skip


def test_tensorboard_event_files_hold_the_logged_scalars_and_hparams(tmp_path):
    counting_fit(tmp_path, hparams={"lr": 0.1, "model": "linear"})
    s = scalars(tmp_path)
    # Means over each interval of 4 steps; the 4-step intervals run across the epoch boundary.
    assert s["train/loss"] == [(4, 1.5), (8, 5.5), (12, 4.5), (16, 3.5), (20, 7.5)]
    assert s["train/double"] == [(k, 2 * v) for k, v in s["train/loss"]]
    assert s["val/acc"] == [(10, 1.5), (20, 1.5)]
    assert [k for k, _ in s["epoch"]] == [4, 8, 12, 16, 20] and [v for _, v in s["epoch"]] == [0, 0, 1, 1, 1]
    hp = [v for ev in read_events(tmp_path) for v in ev.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]
    infos = [plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content) for v in hp]
    start = next(i.session_start_info for i in infos if i.HasField("session_start_info"))
    assert start.hparams["lr"].number_value == pytest.approx(0.1) and start.hparams["model"].string_value == "linear"


def hparams_infos(log_dir):
    """{tag: HParamsPluginData} of the hparams plugin's summaries in ``log_dir``."""
    values = [v for ev in read_events(log_dir) for v in ev.summary.value if v.metadata.plugin_data.plugin_name == "hparams"]
    return {v.tag: plugin_hparams_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content) for v in values}


def test_hparams_without_metrics_leave_tensorboard_its_metric_columns(tmp_path):
    # TensorBoard's hparams plugin takes a run's `_hparams_/experiment` summary as it is, and derives the metric
    # columns from the runs' scalar tags only when no run has one: an experiment with no metric_infos (what fit
    # wrote) showed no metric column at all, so runs could not be compared on val/acc.
    counting_fit(tmp_path / "fit", hparams={"lr": 0.1, "model": "linear"})
    infos = hparams_infos(tmp_path / "fit")
    assert set(infos) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = infos["_hparams_/session_start_info"].session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(0.1) and start.hparams["model"].string_value == "linear"
    # Metrics named: the experiment lists them (TensorBoard shows those columns).
    w = TensorBoardWriter(tmp_path / "named")
    w.log_hparams({"lr": 0.1}, metrics=["val/acc"])
    w.close()
    infos = hparams_infos(tmp_path / "named")
    assert [m.name.tag for m in infos["_hparams_/experiment"].experiment.metric_infos] == ["val/acc"]
    assert infos["_hparams_/session_start_info"].session_start_info.hparams["lr"].number_value == pytest.approx(0.1)


def test_csv_holds_the_same_values(tmp_path):
    counting_fit(tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    assert train == [(4, 1.5), (8, 5.5), (12, 4.5), (16, 3.5), (20, 7.5)]
    assert [(int(r["step"]), float(r["val/acc"])) for r in rows if r["val/acc"]] == [(10, 1.5), (20, 1.5)]


def test_jsonl_writer(tmp_path):
    w = JSONLWriter(tmp_path)
    w.log_hparams({"lr": 0.1, "dev": torch.device("cpu")})
    w.log_metrics({"train/loss": 0.5}, step=3)
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"hparams": {"lr": 0.1, "dev": "cpu"}}, {"step": 3, "train/loss": 0.5}]


def test_csv_and_jsonl_writers_log_a_tensor_or_numpy_number_as_its_value(tmp_path):
    # The CSV wrote the tensor's repr ("tensor(0.1235)": 4 digits, no number) and JSONL raised; Lightning's CSVLogger
    # writes .item(). fit passes Python floats: this is a writer called directly.
    import numpy as np

    values = {"x": torch.tensor(0.123456789), "n": torch.tensor(2**53 + 1), "h": torch.tensor(0.5, dtype=torch.bfloat16),
              "f": np.float32(0.25), "i": np.int64(7)}
    expected = {k: v.item() for k, v in values.items()}  # the reference: the values as Python numbers
    c, j = CSVWriter(tmp_path / "c"), JSONLWriter(tmp_path / "j")
    c.log_metrics(values, step=1)
    j.log_metrics(values, step=1)
    c.close()
    j.close()
    with open(tmp_path / "c" / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert {k: (int(row[k]) if k in ("n", "i") else float(row[k])) for k in values} == expected
    assert row["n"] == str(2**53 + 1)  # exact, not through a float
    (line,) = [json.loads(x) for x in (tmp_path / "j" / "metrics.jsonl").read_text().splitlines()]
    assert line == {"step": 1, **expected}


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(fnlit.distributed, "rank", lambda: 1)
    log = Logger([JSONLWriter(tmp_path / "j")], log_dir=tmp_path / "tb")
    log.log_metrics({"a": 1.0}, step=1)
    log.log_hparams({"lr": 1})
    log.close()
    assert not (tmp_path / "j").exists() and not (tmp_path / "tb").exists()


def test_writers_built_under_torchrun_before_init_write_on_rank_0_only(tmp_path, monkeypatch):
    # A logger built at the top of a script, before fnlit.distributed.init(), wrote on every rank (two ranks
    # through one metrics.csv.tmp). Lightning's rank_zero_only reads RANK before the process group exists.
    monkeypatch.setenv("RANK", "1")
    log = Logger([JSONLWriter(tmp_path / "j"), CSVWriter(tmp_path / "c")], log_dir=tmp_path / "tb")
    log.log_metrics({"a": 1.0}, step=1)
    log.close()
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("RANK", "0")
    w = JSONLWriter(tmp_path / "j")
    w.log_metrics({"a": 1.0}, step=1)
    w.close()
    assert (tmp_path / "j").exists()


def test_writers_skip_nothing_across_new_columns(tmp_path):
    w = CSVWriter(tmp_path / "m.csv")
    w.log_metrics({"a": 1.0}, 1)
    w.log_metrics({"a": 2.0}, 2)
    w.log_metrics({"b": 3.0}, 2)
    assert list(csv.reader((tmp_path / "m.csv").read_text().splitlines())) == [["step", "a", "b"], ["1", "1.0", ""], ["2", "2.0", ""], ["2", "", "3.0"]]
    tb = TensorBoardWriter(tmp_path / "tb")
    tb.log_metrics({"a": 1.0}, 7)
    tb.close()
    assert scalars(tmp_path / "tb") == {"a": [(7, 1.0)]}


def test_tensorboard_events_reach_the_file_at_each_log_and_writers_never_share_a_file(tmp_path):
    first, second = TensorBoardWriter(tmp_path), TensorBoardWriter(tmp_path)  # the same second, the same folder
    first.log_metrics({"a": 1.0, "b": 2}, 3)
    second.log_metrics({"a": 5.0}, 4)
    # Not closed (as after a crash): what was logged is already in the files.
    assert [ev.file_version for ev in read_events(tmp_path) if ev.file_version] == ["brain.Event:2"] * 2
    assert {k: sorted(v) for k, v in scalars(tmp_path).items()} == {"a": [(3, 1.0), (4, 5.0)], "b": [(3, 2.0)]}
    first.close(), second.close()
    assert len([f for f in os.listdir(tmp_path) if "tfevents" in f]) == 2


def test_batched_writers_write_the_first_log_at_once_then_hold_rows_until_flush(tmp_path):
    tb, log = TensorBoardWriter(tmp_path / "tb", flush_secs=3600), CSVWriter(tmp_path / "m.csv", flush_secs=3600)
    log.flush()
    assert not (tmp_path / "m.csv").exists()  # no row yet: no file (not one with only a header)
    for w in (tb, log):
        w.log_metrics({"a": 1.0}, 1)  # the first log is written at once: a new run shows up immediately
        w.log_metrics({"a": 2.0, "b": 3.0}, 2)  # within flush_secs of that write: held
    assert scalars(tmp_path / "tb") == {"a": [(1, 1.0)]}
    assert (tmp_path / "m.csv").read_text().splitlines() == ["step,a", "1,1.0"]
    tb.flush(), log.flush()  # as fit does after a validation and when it ends (also on errors)
    assert scalars(tmp_path / "tb") == {"a": [(1, 1.0), (2, 2.0)], "b": [(2, 3.0)]}
    assert list(csv.reader((tmp_path / "m.csv").read_text().splitlines())) == [["step", "a", "b"], ["1", "1.0", ""], ["2", "2.0", "3.0"]]
    log.log_metrics({"a": 4.0}, 3)
    log.flush_secs = 0  # a row due now is written at once, with the ones before it
    log.log_metrics({"c": 5.0}, 4)
    assert (tmp_path / "m.csv").read_text().splitlines()[-2:] == ["3,4.0,,", "4,,,5.0"]
    tb.close(), log.close()


def test_closed_writers_refuse_values_and_never_rewrite_their_file(tmp_path):
    tb, log = TensorBoardWriter(tmp_path, flush_secs=3600), CSVWriter(tmp_path, flush_secs=3600)
    jsonl = JSONLWriter(tmp_path)  # it dropped lines logged after close without a word
    for w in (tb, log, jsonl):
        w.log_metrics({"a": 1.0}, 1)
        w.close()
        w.close()  # a second close is a no-op
        with pytest.raises(ValueError, match="is closed: make a new writer"):
            w.log_metrics({"a": 2.0}, 2)
        with pytest.raises(ValueError, match="is closed: make a new writer"):  # TB dropped them, CSV wrote them
            w.log_hparams({"lr": 0.1})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1, "a": 1.0}']
    assert not (tmp_path / "hparams.json").exists() and hparams_infos(tmp_path) == {}
    newer = tmp_path / "metrics.csv"
    newer.write_text("step,b\n7,1.0\n")  # a later run's file in the same folder
    log.flush()
    del log
    gc.collect()  # __del__ of a closed writer
    assert newer.read_text() == "step,b\n7,1.0\n"
    assert scalars(tmp_path) == {"a": [(1, 1.0)]}


def test_validation_metrics_are_written_when_the_validation_ends(tmp_path):
    seen = []

    class Peek:  # reads the CSV file fit is writing, right after each validation
        def on_validation(self, state, metrics):
            rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
            seen.append((rows[-1]["step"], rows[-1]["val/acc"], len(rows)))

    def step(s, b):
        return s.replace(step=s.step + 1), {"loss": torch.tensor(0.5)}

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    eval_step = lambda s, b: {"acc": torch.tensor(0.25)}  # noqa: E731
    fit(step, state, list(range(10)), eval_step=eval_step, val_data=[0], max_epochs=2, log_every_n_steps=1,
        num_sanity_val_steps=0, log_dir=tmp_path, callbacks=[Peek()], progress=False)
    assert seen == [("10", "0.25", 11), ("20", "0.25", 22)]  # 10 train rows + 1 validation row per epoch


def slow_fit():
    def step(s, b):
        time.sleep(0.004)  # 150 steps take 0.6 s: the bar (mininterval 0.25 s) redraws a few times
        return s.replace(step=s.step + 1), {"loss": torch.tensor(0.125)}

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    fit(step, state, list(range(150)), max_epochs=1, log_every_n_steps=10)  # progress=None: decided by stdout


def _fit_in_terminal(rows, columns):
    """What slow_fit writes to a pseudo-terminal of that size."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    chunks = []
    reader = threading.Thread(target=lambda: _drain(master, chunks), daemon=True)
    reader.start()
    with open(slave, "w", closefd=True) as terminal, contextlib.redirect_stdout(terminal):
        slow_fit()
    reader.join(timeout=10)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_in_a_terminal():
    out = _fit_in_terminal(24, 120)  # a 120-column terminal
    assert "epoch 0" in out and "150/150" in out and "steps/s" in out and "loss=0.125" in out and "step=150" in out


@pytest.mark.parametrize("rows, columns", [(0, 0), (0, 120)])
def test_progress_bar_in_a_terminal_that_reports_no_size(rows, columns):
    # Some pseudo-terminals report 0 rows (and columns); tqdm reading that height hid the bar entirely.
    out = _fit_in_terminal(rows, columns)
    assert "epoch 0" in out and "150/150" in out and "loss=0.125" in out


def _drain(fd, chunks):
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other end was closed
            return
        if not chunk:
            return
        chunks.append(chunk)


def test_no_progress_bar_in_a_pipe():
    r, w = os.pipe()
    with open(w, "w", closefd=True) as pipe, contextlib.redirect_stdout(pipe):
        slow_fit()
    with open(r, "rb", closefd=True) as f:
        assert f.read() == b""


def crash_at(step):
    class Crash:  # a crash after the last checkpoint: no final log, no save on exit
        def on_step(self, state, metrics):
            if int(state.step) == step:
                raise RuntimeError("crash")

    return Crash()


def test_a_resumed_run_continues_the_csv_as_an_uninterrupted_run_writes_it(tmp_path):
    counting = dict(log_every_n_steps=5)
    counting_fit(tmp_path / "whole", **counting)
    # The same run, crashed at step 17 after logging step 15, then resumed from its checkpoint at step 10
    # into the same log_dir: the resumed run logs step 15 again.
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", every_n_steps=10)
    with pytest.raises(RuntimeError, match="crash"):
        counting_fit(tmp_path / "resumed", checkpoint=ckpts, callbacks=[crash_at(17)], **counting)
    first = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in first[1:]] == ["5", "10", "10", "15"]  # logged past the checkpoint
    counting_fit(tmp_path / "resumed", checkpoint=ckpts, ckpt_path="last", **counting)
    whole = (tmp_path / "whole" / "metrics.csv").read_text()
    assert [r.split(",")[0] for r in whole.splitlines()[1:]] == ["5", "10", "10", "15", "20", "20"]
    assert (tmp_path / "resumed" / "metrics.csv").read_text() == whole  # nothing lost, nothing twice
    # TensorBoard: the resumed run's file starts with a SessionLog START at step 11 (TensorBoard's rule,
    # as tensorboardX's purge_step writes it), so the interrupted run's step 15 is dropped, not shown twice.
    files = sorted(f for f in os.listdir(tmp_path / "resumed") if f.startswith("events.out.tfevents"))
    resumed_events = read_events_file(tmp_path / "resumed" / files[-1])
    starts = [ev.step for ev in resumed_events if ev.HasField("session_log")]
    assert starts == [11] and resumed_events[1].session_log.status == event_pb2.SessionLog.START


def tensorboard_view(log_dir):
    """The scalars TensorBoard shows: its files in name order, a SessionLog START at step s dropping what was read
    before it at step s or later."""
    shown = []
    for ev in read_events(log_dir):
        if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
            shown = [x for x in shown if x[1] < ev.step]
        shown += [(v.tag, ev.step, v.simple_value) for v in ev.summary.value if v.HasField("simple_value")]
    return sorted(shown)


@pytest.mark.parametrize("saving", [{}, dict(monitor="val/acc", save_last=False)])  # (the last file: a best's)
@pytest.mark.parametrize("stop", [dict(max_epochs=1), dict(max_steps=7)])
def test_continuing_a_finished_run_to_larger_limits_logs_what_one_run_to_them_logs(tmp_path, stop, saving):
    # A run that ended between log rows logged its last, partial interval (steps 10, or 7, alone), saved no metrics
    # for a continuation: continued to max_epochs=2 it logged that step's row twice (the partial mean, then the
    # validation beside it) and the next interval's mean without the steps before the stop (steps 11-12 at 12).
    def run(log_dir, checkpoint=None, **limits):
        state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
        data = [torch.tensor([float(i)]) for i in range(10)]
        step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
        return fit(step, state, data, val_data=[torch.tensor([1.0, 2.0])], eval_step=lambda s, b: {"acc": b.mean()},
                   val_check_interval=7 if "max_steps" in limits else None, log_every_n_steps=3, progress=False,
                   log_dir=str(log_dir), checkpoint=checkpoint, ckpt_path="last" if checkpoint else None, **limits)  # fmt: skip

    whole = {"max_steps": 20} if "max_steps" in stop else {"max_epochs": 2}
    run(tmp_path / "whole", **whole)
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", **saving)
    run(tmp_path / "continued", ckpts, **stop)
    first = list(csv.DictReader((tmp_path / "continued" / "metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in first][-2:] == [str(*stop.values()) if "max_steps" in stop else "10"] * 2  # validation, last interval
    run(tmp_path / "continued", ckpts, **whole)
    assert (tmp_path / "continued" / "metrics.csv").read_text() == (tmp_path / "whole" / "metrics.csv").read_text()
    assert tensorboard_view(tmp_path / "continued") == tensorboard_view(tmp_path / "whole")
    rows = list(csv.DictReader((tmp_path / "whole" / "metrics.csv").read_text().splitlines()))
    at = 12 if "max_epochs" in stop else 9  # the interval across the stop: its mean by hand (step i sees batch i-1)
    span = [float((i - 1) % 10) for i in range(at - 2, at + 1)]
    assert float(next(r for r in rows if r["step"] == str(at))["train/loss"]) == pytest.approx(sum(span) / 3)


def read_events_file(path):
    d = tmp = pathlib.Path(path).parent / ("only_" + pathlib.Path(path).name)
    d.mkdir()
    (tmp / pathlib.Path(path).name).write_bytes(pathlib.Path(path).read_bytes())
    return read_events(d)


def test_the_last_log_names_the_last_epoch_and_fit_leaves_no_thread_behind(tmp_path):
    before = {t.name for t in threading.enumerate()}
    counting_fit(tmp_path, log_every_n_steps=3)  # 2 epochs of 10 steps: the last log is at step 20, epoch 1
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert rows[-1]["step"] == "20" and rows[-1]["epoch"] == "1"
    assert {t.name for t in threading.enumerate()} <= before  # no tqdm monitor thread left (progress=False)


@pytest.mark.parametrize("values", [[torch.tensor(1.0), 2.0], [1.0, torch.tensor(2.0)]])
def test_a_metric_given_as_tensor_and_number_at_different_steps_is_averaged(values):
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    buf = MetricBuffer(("train/", "val/"), on_log=[])
    buf.pending += [{"m": v} for v in values]
    assert buf.flush(state, epoch=0)["train/m"] == 1.5


def test_metrics_on_an_accelerator_beside_a_host_number_are_gathered_there(monkeypatch):
    # A host number first ({"tokens": n, "loss": loss}) made the CPU the gather device: the GPU means were copied to
    # it with non_blocking=True, which the CPU's stack reads before the copies land. The meta device stands in for
    # the GPU (its values cannot be read: where they are gathered is what is checked).
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    buf = MetricBuffer(("train/", "val/"), on_log=[])
    buf.pending += [{"tokens": 128, "loss": torch.tensor(2.0, device="meta")}] * 2
    tolist, read = torch.Tensor.tolist, []

    def recording_tolist(t):  # the interval's host read
        read.append(t.device)
        return [0.0] * t.numel() if t.is_meta else tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", recording_tolist)
    assert list(buf.flush(state, epoch=0)) == ["train/tokens", "train/loss", "epoch"]
    assert [d.type for d in read] == ["meta"]  # gathered on the accelerator, read back once


@pytest.mark.cuda
def test_metrics_on_a_gpu_beside_a_host_number_log_their_values():
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1).cuda(), fnlit.optim.sgd(0.1), seed=0)
    for _ in range(20):
        big = torch.randn(4096, 4096, device="cuda")
        losses = [(big @ big).mean() + i for i in range(4)]  # queued work: a copy not waited for lands late
        buf = MetricBuffer(("train/", "val/"), on_log=[])
        buf.pending += [{"tokens": 128, "loss": loss} for loss in losses]
        logged = buf.flush(state, epoch=0)
        assert logged["train/loss"] == pytest.approx(sum(loss.item() for loss in losses) / 4, rel=1e-5)
        assert logged["train/tokens"] == 128


class Full:
    """A writer whose disk is full: every flush fails."""

    def log_metrics(self, metrics, step): ...
    def log_hparams(self, hparams): ...
    def close(self): ...
    def flush(self):
        raise OSError(28, "No space left on device")


def test_a_failing_writer_does_not_cost_the_log_dir_its_rows(tmp_path):
    with pytest.raises(OSError, match="No space left") as info:  # the traceback kept: fit's frames stay alive
        counting_fit(tmp_path, log_every_n_steps=2, loggers=[Full()], max_steps=10)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))  # written and closed despite the error
    assert [r["step"] for r in rows if r.get("train/loss")] == ["2", "4", "6", "8", "10"]
    del info


def test_a_writer_refusing_a_row_or_hparams_does_not_cost_the_writers_after_it_theirs(tmp_path):
    # Logger.log_metrics/log_hparams stopped at the first writer that raised (fit puts the caller's loggers first):
    # the log_dir's CSV lost the row. Reference: what the other writers write when the failing one is left out.
    class Refusing(Full):
        def log_metrics(self, *args):
            raise OSError(28, "No space left on device")

        log_hparams = log_metrics

    log = Logger([Refusing(), JSONLWriter(tmp_path)])
    with pytest.raises(OSError, match="No space left"):
        log.log_hparams({"lr": 0.5})
    with pytest.raises(OSError, match="No space left"):
        log.log_metrics({"loss": 0.25}, step=3)
    log.writers[1].close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"hparams": {"lr": 0.5}}', '{"step": 3, "loss": 0.25}']


def test_a_log_dir_whose_csv_is_refused_keeps_its_tensorboard_files_as_they_were(tmp_path):
    # The TensorBoardWriter was made first: its purge marker hid the earlier run's scalars though the Logger refused.
    tb = TensorBoardWriter(tmp_path)
    tb.log_metrics({"loss": 0.5}, step=1)
    tb.close()
    (tmp_path / "metrics.csv").write_text("epoch,score\n1,0.5\n")  # no CSVWriter's file
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="has no 'step' column"):
        Logger(log_dir=tmp_path, purge_step=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_every_writer_refuses_a_metric_named_step(tmp_path):
    # CSV and JSONL wrote it as the row's step ({"step": step, **metrics}: 0.5 for step 100), TensorBoard at step 100.
    for w in (TensorBoardWriter(tmp_path), CSVWriter(tmp_path), JSONLWriter(tmp_path)):
        with pytest.raises(ValueError, match=f"{type(w).__name__}.log_metrics: got a metric named 'step' .*rename"):
            w.log_metrics({"step": 0.5, "loss": 2.0}, step=100)
        w.close()
    assert scalars(tmp_path) == {} and (tmp_path / "metrics.jsonl").read_text() == ""
    assert not (tmp_path / "metrics.csv").exists()


def test_a_batching_tensorboard_writer_refuses_a_value_that_is_no_number_when_it_is_logged(tmp_path):
    # It was converted at the flush: close raised, and the valid events batched after it (steps 3, 4) were lost.
    w = TensorBoardWriter(tmp_path, flush_secs=3600)
    w.log_metrics({"loss": 1.0}, step=1)
    with pytest.raises(TypeError, match="metric 'loss' at step 2 is NoneType None, not a number"):
        w.log_metrics({"loss": None}, step=2)
    w.log_metrics({"loss": 3.0}, step=3)
    w.log_metrics({"loss": torch.tensor(4.0)}, step=4)
    w.close()
    assert scalars(tmp_path) == {"loss": [(1, 1.0), (3, 3.0), (4, 4.0)]}


def test_csv_writer_keeps_the_earlier_rows_a_later_writer_does_not_log_again(tmp_path):
    earlier = "step,loss,epoch,val/acc,gone\n1,0.5,0,,\n2,0.25,0,,\n2,,,0.75,\n3,0.125,0,,\n3,,,0.5,1.0\n4,1.0,1,,\n"
    (tmp_path / "metrics.csv").write_text(earlier)
    w = CSVWriter(tmp_path, flush_secs=3600)
    w.log_metrics({"val/acc": 0.875}, 2)  # replaces the earlier val/acc at step 2 and every row after step 2
    assert (tmp_path / "metrics.csv").read_text() == "step,loss,epoch,val/acc\n1,0.5,0,\n2,0.25,0,\n2,,,0.875\n"
    w.log_metrics({"loss": 2.0, "epoch": 0, "new": 3.0}, 3)
    w.close()
    assert list(csv.reader((tmp_path / "metrics.csv").read_text().splitlines())) == [
        ["step", "loss", "epoch", "val/acc", "new"], ["1", "0.5", "0", "", ""], ["2", "0.25", "0", "", ""],
        ["2", "", "", "0.875", ""], ["3", "2.0", "0", "", "3.0"],
    ]  # fmt: skip
    assert os.listdir(tmp_path) == ["metrics.csv"]  # the rewrites' temporary file was renamed over it


def test_csv_writer_refuses_to_overwrite_a_file_it_cannot_continue(tmp_path):
    other = tmp_path / "metrics.csv"
    other.write_text("epoch,score\n1,0.5\n")
    with pytest.raises(ValueError, match="has no 'step' column.*Move it away"):
        CSVWriter(tmp_path)
    other.write_text("step,loss\n1,0.5\nlast,0.25\n")
    with pytest.raises(ValueError, match="line 3 of .* is not a row a CSVWriter writes"):
        CSVWriter(tmp_path)
    assert other.read_text() == "step,loss\n1,0.5\nlast,0.25\n"


@pytest.mark.parametrize("lacking", [0, 1, 2])
def test_a_metric_not_returned_at_every_step_of_an_interval_is_an_error_whichever_step_lacks_it(lacking):
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
    buf = MetricBuffer(("train/", "val/"), on_log=[])
    buf.pending += [{"loss": torch.tensor(1.0), "extra": torch.tensor(5.0)} for _ in range(3)]
    del buf.pending[lacking]["extra"]
    with pytest.raises(KeyError, match="returned metric 'extra' at some steps but not others"):
        buf.flush(state, epoch=0)
    buf.pending += [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(3.0)}]  # the same keys at every step: logged
    assert buf.flush(state, epoch=0) == {"train/loss": 2.0, "epoch": 0}


def test_a_fresh_run_into_an_old_folder_replaces_its_rows_in_the_csv_as_in_tensorboard(tmp_path):
    counting_fit(tmp_path, log_every_n_steps=5)  # logs steps 5, 10, 15, 20
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    fit(step, state, [torch.tensor([1.0])] * 10, max_epochs=1, log_every_n_steps=10, progress=False, log_dir=str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["10"]  # the older run's rows from step 1 on (5 too) are gone, as in TensorBoard
    newest = sorted(f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents"))[-1]
    assert [ev.step for ev in read_events_file(tmp_path / newest) if ev.HasField("session_log")] == [1]


def test_a_purging_csv_writer_drops_the_later_rows_even_if_it_logs_nothing(tmp_path):
    w = CSVWriter(tmp_path)
    for step in (5, 10, 15):
        w.log_metrics({"loss": float(step)}, step)
    w.close()
    CSVWriter(tmp_path, purge_step=11).close()  # a resumed run that crashed before its first log
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "5,5.0", "10,10.0"]


def test_a_resumed_run_leaves_the_callers_own_writers_as_an_uninterrupted_run_writes_them(tmp_path):
    # Writers passed in loggers=, not made by fit: fit tells them where the run starts (purge), so the
    # interrupted run's step 15, logged past the checkpoint at step 10, is not in the files twice.
    def run(folder, **kw):
        folder.mkdir(exist_ok=True)
        writers = [JSONLWriter(folder), TensorBoardWriter(folder)]
        try:
            counting_fit(tmp_path / "unused", loggers=writers, log_every_n_steps=5, **kw)
        finally:
            for w in writers:
                w.close()

    run(tmp_path / "whole")
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", every_n_steps=10)
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "resumed", checkpoint=ckpts, callbacks=[crash_at(17)])
    assert [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()] == [5, 10, 10, 15]
    run(tmp_path / "resumed", checkpoint=ckpts, ckpt_path="last")
    whole = (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text() == whole  # nothing lost, nothing twice
    files = sorted(f for f in os.listdir(tmp_path / "resumed") if f.startswith("events.out.tfevents"))
    assert [ev.step for ev in read_events_file(tmp_path / "resumed" / files[-1]) if ev.HasField("session_log")] == [11]


def test_jsonl_purge_drops_every_later_step_and_keeps_other_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"hparams": {"lr": 0.1}}\n{"step": 5, "a": 1}\nnot json\n{"step": 20, "a": 2}\n{"step": 3, "a": 3}')
    w = JSONLWriter(path)  # the last line, cut off by a killed process, is ended before this writer's lines
    w.log_metrics({"a": 4.0}, step=30)
    w.purge(10)  # the earlier run's step 20 and this writer's step 30 go
    w.log_metrics({"a": 5.0}, step=11)
    w.close()
    assert path.read_text().splitlines() == [
        '{"hparams": {"lr": 0.1}}', '{"step": 5, "a": 1}', "not json", '{"step": 3, "a": 3}', '{"step": 11, "a": 5.0}',
    ]


def test_a_sweep_appending_fresh_runs_to_one_jsonl_file_keeps_every_run(tmp_path):
    # Not a resume: fit leaves what is in the user's file alone (each run its hparams line and its steps).
    for lr in (0.1, 0.01):
        w = JSONLWriter(tmp_path / "sweep.jsonl")
        counting_fit(tmp_path / "unused", loggers=[w], hparams={"lr": lr}, log_every_n_steps=10)
        w.close()
    lines = [json.loads(x) for x in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert [x.get("hparams", {}).get("lr") or x["step"] for x in lines if "hparams" in x or "train/loss" in x] == [0.1, 10, 20, 0.01, 10, 20]


def test_a_retry_in_the_same_process_with_the_same_writers_logs_each_step_once(tmp_path):
    writers = [JSONLWriter(tmp_path / "retry"), CSVWriter(tmp_path / "retry")]
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", every_n_steps=10)
    with pytest.raises(RuntimeError, match="crash"):
        counting_fit(tmp_path / "unused", loggers=writers, checkpoint=ckpts, callbacks=[crash_at(17)], log_every_n_steps=5)
    counting_fit(tmp_path / "unused2", loggers=writers, checkpoint=ckpts, ckpt_path="last", log_every_n_steps=5)
    for w in writers:
        w.close()
    whole = JSONLWriter(tmp_path / "whole")  # the uninterrupted run: the reference
    counting_fit(tmp_path / "unused3", loggers=[whole], log_every_n_steps=5)
    whole.close()
    assert (tmp_path / "retry" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    steps = [r.split(",")[0] for r in (tmp_path / "retry" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["5", "10", "10", "15", "20", "20"]


def test_jsonl_writes_non_finite_values_as_strict_json(tmp_path):
    w = JSONLWriter(tmp_path)
    w.log_metrics({"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5}, step=1)
    w.close()

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)  # a strict reader
    assert line == {"step": 1, "a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5}
    assert [float(line[k]) for k in "bc"] == [float("inf"), -float("inf")] and float(line["a"]) != float(line["a"])


def test_a_csv_purge_after_pending_rows_writes_each_row_once(tmp_path):
    w = CSVWriter(tmp_path)
    w.log_metrics({"loss": 1.0}, 5)
    w.log_metrics({"loss": 2.0}, 15)
    w.close()
    w = CSVWriter(tmp_path, flush_secs=3600)
    w.log_metrics({"loss": 3.0}, 10)  # written at once (the first; it replaces the earlier step 15), then held
    w.log_metrics({"loss": 4.0}, 11)  # held
    w.log_metrics({"loss": 4.5}, 12)  # held
    w.purge(12)  # drops the held step 12: the file is rewritten, the held step 11 with it
    w.log_metrics({"loss": 5.0}, 12)
    w.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "5,1.0", "10,3.0", "11,4.0", "12,5.0"]


def test_tensorboard_reads_one_processes_event_files_in_the_order_they_were_made(tmp_path, monkeypatch):
    # TensorBoard loads a folder's files in name order; a resume's purge marker must come after the
    # interrupted run's events, also for the 10th file a process opens within one second.
    import itertools

    monkeypatch.setattr(TensorBoardWriter, "_opened", itertools.count(8))
    made = []
    for _ in range(4):
        w = TensorBoardWriter(tmp_path)
        made.append(os.path.basename(w.path))
        w.close()
    assert sorted(made) == made


def test_tensorboard_reads_event_files_of_processes_in_the_order_they_were_made(tmp_path, monkeypatch):
    # A job resumed by a new process within the same second (a quick restart): its file was named by the
    # pid after the time stamp, and pid 10000 sorts before 9999, so TensorBoard read the purge marker first
    # and the interrupted run's later steps after it, showing them twice. Also a restart on another host.
    import socket

    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    made = []
    for pid, host in ((9999, "b"), (10000, "b"), (20000, "a")):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        w = TensorBoardWriter(tmp_path)
        made.append(os.path.basename(w.path))
        w.close()
    assert sorted(os.listdir(tmp_path)) == made


def test_flattened_metric_names_that_collide_are_an_error():
    from fnlit.summary import flat_metrics

    with pytest.raises(ValueError, match="Two metrics are both named 'a/b'"):
        flat_metrics({"a/b": torch.tensor(1.0), "a": {"b": torch.tensor(2.0)}})
    assert flat_metrics({"a": {"b": 1.0}, "a/c": 2.0}) == {"a/b": 1.0, "a/c": 2.0}


def test_flattened_hyperparameter_names_that_collide_are_named_as_hyperparameters():
    from fnlit.summary import flat_hparams

    with pytest.raises(ValueError, match="Two hyperparameters are both named 'optim/lr'"):
        flat_hparams({"optim/lr": 0.1, "optim": {"lr": 0.2}})


def test_an_ensemble_metric_beside_one_named_as_its_member_is_an_error():
    model, tx = torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1)
    state = fnlit.stack_states([fnlit.TrainState.create(model, tx, seed=i) for i in range(2)])
    buf = MetricBuffer(("train/", "val/"), on_log=[])
    buf.pending.append({"loss": torch.tensor([1.0, 2.0]), "loss/0": torch.tensor(5.0)})
    with pytest.raises(ValueError, match="the training step gives two metrics the name 'train/loss/0'"):
        buf.flush(state, 0)
    from fnlit.loop import evaluate

    with pytest.raises(ValueError, match="the eval step gives two metrics the name 'acc/1'"):
        evaluate(lambda s, b: {"acc": torch.tensor([0.5, 0.7]), "acc/1": torch.tensor(0.1)}, state, [torch.zeros(2)])


def test_two_jobs_sharing_one_jsonl_file_keep_each_others_lines_when_they_start(tmp_path):
    # The start-or-resume idiom (ckpt_path="last") with nothing saved yet is a start: nothing is purged.
    class Copying(fnlit.checkpoint.Checkpointer):  # a restore that hands back a copy even when it found nothing
        def restore(self, ckpt_path, like):
            state, position = super().restore(ckpt_path, like)
            return state.replace(), position

    for name in ("a", "b"):
        w = JSONLWriter(tmp_path / "shared.jsonl")
        ckpts = (Copying if name == "b" else fnlit.checkpoint.Checkpointer)(tmp_path / name, every_n_steps=100)
        counting_fit(tmp_path / "unused", loggers=[w], checkpoint=ckpts, ckpt_path="last", log_every_n_steps=10)
        w.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "shared.jsonl").read_text().splitlines()]
    assert [s for s in steps if s % 10 == 0] == [10, 10, 20, 20] * 2  # each job's train and val lines


def test_a_resume_from_a_checkpoint_without_a_position_purges_the_users_writers_too(tmp_path):
    # A state saved by a callback (fnlit.save: no driver position) and resumed from: the steps after it once.
    class SaveAt5:
        def on_step(self, state, metrics):
            if int(state.step) == 5:
                fnlit.checkpoint.save(tmp_path / "at5.ckpt", state)

    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt")
    w = JSONLWriter(tmp_path / "job")
    with pytest.raises(RuntimeError, match="crash"):
        counting_fit(tmp_path / "u1", loggers=[w], checkpoint=ckpts, callbacks=[SaveAt5(), crash_at(8)], log_every_n_steps=1)
    counting_fit(tmp_path / "u2", loggers=[w], checkpoint=ckpts, ckpt_path=str(tmp_path / "at5.ckpt"), log_every_n_steps=1)
    w.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == sorted(set(steps))  # each step once


def test_a_fit_after_a_resumed_one_without_ckpt_path_purges_nothing(tmp_path):
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt")
    w = JSONLWriter(tmp_path / "log")
    counting_fit(tmp_path / "u1", loggers=[w], checkpoint=ckpts)
    counting_fit(tmp_path / "u2", loggers=[w], checkpoint=ckpts, ckpt_path="last")  # nothing left to train
    before = (tmp_path / "log" / "metrics.jsonl").read_text()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Checkpointer folder .* already holds")
        counting_fit(tmp_path / "u3", loggers=[w], checkpoint=ckpts)  # a fresh run: appends
    w.close()
    assert len(before) > 0 and (tmp_path / "log" / "metrics.jsonl").read_text() == before * 2  # the same run again


def test_csv_writer_writes_utf8_whatever_the_locale(tmp_path):
    # open() without an encoding used the locale's: a non-ASCII metric name crashed on an ASCII (POSIX) locale.
    import os
    import subprocess
    import sys

    code = (
        "import fnlit.summary as s, sys; w = s.CSVWriter(sys.argv[1]); "
        "w.log_metrics({'val/\\u51c6\\u786e\\u7387': 0.5}, step=1); w.close()"  # (escaped: argv is ASCII here)
    )
    path = tmp_path / "metrics.csv"
    env = {**os.environ, "LC_ALL": "POSIX", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, capture_output=True, timeout=120)
    assert path.read_text(encoding="utf-8").splitlines() == ["step,val/\u51c6\u786e\u7387", "1,0.5"]


def test_hparams_keep_numpy_and_tensor_numbers_and_flatten_nested_dicts_as_lightning(tmp_path):
    # They became strings ("32", "tensor(0.1000)", "{'name': 'adam', ...}"): not filterable in TensorBoard's HPARAMS.
    import numpy as np

    w = CSVWriter(tmp_path / "m.csv")
    w.log_hparams({"bs": np.int64(32), "lr": torch.tensor(0.5), "optim": {"name": "adam", "b1": 0.9}, "tags": [1, 2]})
    w.close()
    written = json.loads((tmp_path / "m.hparams.json").read_text())
    assert written == {"bs": 32, "lr": 0.5, "optim/name": "adam", "optim/b1": 0.9, "tags": "[1, 2]"}


def test_csv_hparams_are_strict_json_and_each_csv_file_in_a_folder_keeps_its_own(tmp_path):
    # NaN/inf were written as bare NaN/Infinity tokens (no JSON), and results/a.csv and results/b.csv shared one
    # hparams.json (the last run's). Reference: JSONLWriter's strings for non-finite floats.
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    for name, lr in [("a", 0.5), ("b", float("inf"))]:
        w = CSVWriter(tmp_path / f"{name}.csv")
        w.log_hparams({"lr": lr, "dropout": float("nan")})
        w.close()
    d = CSVWriter(tmp_path / "run")  # a directory's metrics.csv: hparams.json, as before
    d.log_hparams({"lr": -float("inf")})
    d.close()
    read = lambda p: json.loads(p.read_text(), parse_constant=refuse)  # noqa: E731 (a strict reader)
    assert read(tmp_path / "a.hparams.json") == {"lr": 0.5, "dropout": "NaN"}
    assert read(tmp_path / "b.hparams.json") == {"lr": "Infinity", "dropout": "NaN"}
    assert read(tmp_path / "run" / "hparams.json") == {"lr": "-Infinity"}
    assert d.hparams_path == str(tmp_path / "run" / "hparams.json") and not (tmp_path / "hparams.json").exists()


def test_the_progress_bar_never_draws_a_new_epoch_under_the_old_ones_name():
    # tqdm.reset drew "epoch 0: 0/4" when epoch 1 started, a frame that stayed up for the whole first step.
    import io
    import re

    from fnlit.summary import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(enabled=True, file=out, mininterval=0)
    bar.start_epoch(0, 4)
    for _ in range(4):
        bar.update()
    bar.start_epoch(1, 4)
    bar.start_epoch(2, 4, initial=3)  # a resume mid-epoch: drawn at its batch
    bar.close()
    frames = [f.strip() for f in re.split(r"[\r\n]", out.getvalue()) if f.strip()]
    done = max(i for i, f in enumerate(frames) if f.startswith("epoch 0") and "4/4" in f)
    assert not [f for f in frames[done + 1 :] if f.startswith("epoch 0")]
    assert [f for f in frames if f.startswith("epoch 2")][-1].split("|")[-1].lstrip().startswith("3/4")


def test_a_resumed_epochs_bar_rates_only_the_steps_run():
    # A resume at batch 500 of 1000 showed ~7,600,000 steps/s at its first draw and ~1,200 at its close for two steps
    # taking 0.1 s each: tqdm's rate counted the 500 skipped batches as run. Reference: 2 steps in >= 0.2 s, <= 10/s.
    import io
    import re
    import time

    from fnlit.summary import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(enabled=True, file=out, mininterval=0)
    bar.start_epoch(0, 1000, initial=500)
    for _ in range(2):
        time.sleep(0.1)
        bar.update()
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", out.getvalue()) if "502/1000" in f]
    rates = [float(r) for f in frames for r in re.findall(r"([0-9.]+)steps/s", f)]
    assert rates and max(rates) <= 10.0, frames


def test_the_progress_bar_labels_an_ensemble_members_loss_as_such():
    # "train/loss/0" was shown as "0=2.017": no name ended in /loss, so the first metric's last part was used.
    import io

    from fnlit.summary import ProgressBar

    for metrics, shown in (({"train/loss": 0.5, "train/acc": 1.0}, "loss=0.5"),
                           ({"train/acc/0": 1.0, "train/loss/0": 2.017, "train/loss/1": 3.0}, "loss/0=2.017")):
        out = io.StringIO()
        bar = ProgressBar(enabled=True, file=out, mininterval=0)
        bar.start_epoch(0, 4)
        bar.set_metrics(12, metrics)
        bar.update()
        bar.close()
        assert out.getvalue().strip().splitlines()[-1].endswith(f"step=12, {shown}]")


def test_a_purging_tensorboard_writer_writes_its_first_values_at_once(tmp_path):
    # The purge marker fit's writers start with counted as the first write: the first values were held for flush_secs.
    w = TensorBoardWriter(tmp_path, flush_secs=3600, purge_step=1)
    w.log_metrics({"train/loss": 1.0}, step=1)  # as without purge_step: a new run shows up immediately
    assert scalars(tmp_path) == {"train/loss": [(1, 1.0)]}
    w.log_metrics({"train/loss": 2.0}, step=2)  # within flush_secs of that write: held
    assert scalars(tmp_path) == {"train/loss": [(1, 1.0)]}
    w.close()
    assert scalars(tmp_path) == {"train/loss": [(1, 1.0), (2, 2.0)]}


_KILLED_AFTER_A_CHECKPOINT = """
import os, signal, sys, time
import torch
import fnlit
torch.set_num_threads(1)

def step(s, b):
    time.sleep(0.05)
    return s.replace(step=s.step + 1), {"loss": b.mean()}

class KillAt:  # SIGKILLs the process at step 23, after the step-20 checkpoint, while the writers hold rows
    def on_step(self, state, metrics):
        if int(state.step) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
data = [torch.tensor([float(i)]) for i in range(40)]
fit_kw = dict(max_steps=40, log_every_n_steps=1, log_dir=sys.argv[1], progress=False)
checkpoint = fnlit.checkpoint.Checkpointer(sys.argv[2], every_n_steps=10)
if sys.argv[3] == "resume":
    fnlit.fit(step, state, data, checkpoint=checkpoint, ckpt_path="last", **fit_kw)
else:
    fnlit.fit(step, state, data, checkpoint=checkpoint, callbacks=[KillAt()], **fit_kw)
"""


def test_a_run_sigkilled_after_a_checkpoint_and_resumed_logs_every_step_once(tmp_path):
    # fit's log_dir writers hold the rows of the last 2 s; a save did not write them, so a process killed after it
    # lost them for good (its resumed run logs from the step after the checkpoint): steps 2-20 were missing.
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_KILLED_AFTER_A_CHECKPOINT)
    args = [sys.executable, "-W", "error", str(script), str(tmp_path / "log"), str(tmp_path / "ckpt")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(fnlit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([*args, "23"], capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert fnlit.checkpoint.read_info(tmp_path / "ckpt" / "last.ckpt").step == 20
    resumed = subprocess.run([*args, "resume"], capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0, resumed.stderr
    # The uninterrupted run's rows, by hand: one per step 1..40, step s's loss the batch it saw (s - 1).
    expected = [(s, float(s - 1)) for s in range(1, 41)]
    rows = list(csv.DictReader((tmp_path / "log" / "metrics.csv").read_text().splitlines()))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == expected
    assert [(step, value) for tag, step, value in tensorboard_view(tmp_path / "log") if tag == "train/loss"] == expected


def test_a_writer_failing_at_a_save_does_not_cost_the_checkpoint_and_fit_leaves_the_checkpointer_as_it_was(tmp_path):
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", every_n_steps=3)
    with pytest.raises(OSError, match="No space left"):
        counting_fit(tmp_path / "log", loggers=[Full()], checkpoint=ckpts, log_every_n_steps=100)
    assert fnlit.checkpoint.read_info(tmp_path / "ckpt" / "last.ckpt").step == 3  # written, then the error raised
    assert ckpts.before_save is None


def test_fit_keeps_a_before_save_of_the_users_own_and_runs_it_after_the_flush(tmp_path):
    # fit set before_save to its writers' flush for the whole run: a hook the user had set was not called at any of
    # the run's saves (review). Reference: the Checkpointer's contract (called before each file is written), and
    # the saves a hand count gives: every 3 steps of 20, then the exit save of step 20.
    ckpts = fnlit.checkpoint.Checkpointer(tmp_path / "ckpt", every_n_steps=3)
    calls = []
    ckpts.before_save = lambda: calls.append((tmp_path / "log" / "metrics.csv").exists())
    hook = ckpts.before_save
    counting_fit(tmp_path / "log", checkpoint=ckpts, log_every_n_steps=1)
    assert len(calls) == 7 and all(calls)  # steps 3, 6, ..., 18 and the exit save; the rows were on disk first
    assert ckpts.before_save is hook



@pytest.mark.parametrize("step", [torch.tensor(5), __import__("numpy").int64(5)], ids=["tensor", "np.int64"])
def test_every_writer_takes_an_integer_tensor_or_numpy_step_and_writes_the_number(tmp_path, step):
    # CSVWriter wrote "tensor(5)" in the step column (and the next CSVWriter refused the file); JSONLWriter raised
    # "Object of type int64 is not JSON serializable". Reference: the plain int 5, as TensorBoardWriter wrote it.
    csv_w, jsonl_w, tb = CSVWriter(tmp_path), JSONLWriter(tmp_path), TensorBoardWriter(tmp_path)
    for w in (csv_w, jsonl_w, tb):
        w.log_metrics({"loss": 0.5}, step=step)
        w.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "5,0.5"]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 5, "loss": 0.5}]
    assert scalars(tmp_path) == {"loss": [(5, 0.5)]}
    CSVWriter(tmp_path).close()  # the file is continued, not refused


@pytest.mark.parametrize("step", [5.0, 5.5, torch.tensor(5.0)], ids=["5.0", "5.5", "float tensor"])
@pytest.mark.parametrize("writer", [CSVWriter, JSONLWriter, TensorBoardWriter])
def test_every_writer_refuses_a_float_step(tmp_path, writer, step):
    w = writer(tmp_path)
    with pytest.raises(TypeError, match=f"{writer.__name__}.log_metrics: step must be an integer"):
        w.log_metrics({"loss": 0.5}, step=step)
    w.close()


def test_hparams_with_a_big_int_and_non_string_keys_are_written_by_every_writer(tmp_path):
    # tensorboardX raised "ufunc 'isnan' not supported" on 2**70 (a 128-bit SeedSequence entropy) and "bad argument
    # type" on the key 1. Reference: Lightning's loggers take keys as str(k); TensorBoard's number is a float64, so
    # an int past 64 bits is written as its decimal string, as any other value it cannot hold.
    import numpy as np

    hp = {"seed": 2**70, 1: 2, "a": {2: 3}, "u": np.uint64(2**64 - 1), "small": -(2**63)}
    tb, jsonl = TensorBoardWriter(tmp_path), JSONLWriter(tmp_path)
    for w in (tb, jsonl, CSVWriter(tmp_path)):
        w.log_hparams(hp)
        w.close()
    expected = {"seed": "1180591620717411303424", "1": 2, "a/2": 3, "u": "18446744073709551615", "small": -(2**63)}
    assert json.loads((tmp_path / "hparams.json").read_text()) == expected
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"hparams": expected}
    start = hparams_infos(tmp_path)["_hparams_/session_start_info"].session_start_info.hparams
    assert {k: v.WhichOneof("kind") for k, v in start.items()} == {
        "seed": "string_value", "1": "number_value", "a/2": "number_value", "u": "string_value", "small": "number_value",
    }  # fmt: skip
    assert start["seed"].string_value == str(2**70) and start["1"].number_value == 2 and start["small"].number_value == -(2.0**63)
    with pytest.raises(ValueError, match="Two hyperparameters are both named '1' once their keys are strings"):
        fnlit.summary.flat_hparams({1: 2, "1": 3})


def test_fit_takes_an_argparse_namespace_as_hparams_and_refuses_other_non_mappings(tmp_path):
    # It raised "'Namespace' object has no attribute 'items'" after opening the log files. Reference: Lightning's
    # loggers take a Namespace as vars(namespace).
    import argparse
    import dataclasses

    counting_fit(tmp_path / "ns", hparams=argparse.Namespace(lr=0.1, opt={"name": "sgd"}))
    assert json.loads((tmp_path / "ns" / "hparams.json").read_text()) == {"lr": 0.1, "opt/name": "sgd"}

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1

    for bad in (Cfg(), [("lr", 0.1)]):
        with pytest.raises(TypeError, match=f"hparams must be a mapping .* or an argparse.Namespace, got {type(bad).__name__}"):
            counting_fit(tmp_path / "bad", hparams=bad)
        assert not (tmp_path / "bad").exists()  # refused before any file was made


def open_files_under(folder):
    """The files this process holds open under ``folder`` (from /proc/self/fd, not from the writers)."""
    folder, found = os.path.realpath(folder), []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own fd is gone by now)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(folder + os.sep):
                found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_fit_closes_its_log_files_when_it_fails_before_training(tmp_path):
    # fit made its writers before the with that closes them: an error in between (here the writers refusing the
    # hparams; a CSV it cannot continue) left the event file open for as long as the traceback lived, although
    # fit's docstring says the log_dir files are closed when fit ends, also on an error.
    with pytest.raises(ValueError, match="Two hyperparameters are both named 'a/b'") as caught:
        counting_fit(tmp_path / "hp", hparams={"a/b": 1, "a": {"b": 2}})
    assert caught.traceback and open_files_under(tmp_path / "hp") == []  # (the traceback, frames and all, still alive)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")  # not a CSVWriter's: refused
    with pytest.raises(ValueError, match="has no 'step' column") as caught:
        counting_fit(tmp_path / "csv")
    assert caught.traceback and open_files_under(tmp_path / "csv") == []


def test_a_csv_writer_holds_only_its_pending_rows_and_rewrites_from_the_file(tmp_path):
    # It kept every row it logged (and the earlier run's) in memory, ~300 bytes a row for the whole run.
    def held(make, log, n):  # bytes the writer holds after logging n rows (its open file's buffers included)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            w = make()
            log(w, 1, n)
            w.flush()
            return w, tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    def log(w, start, stop):  # loss at every step; lr too from step 1500 on: a new column late in the run
        for s in range(start, stop):
            w.log_metrics({"loss": float(s), **({"lr": 0.5} if s >= 1500 else {})}, s)

    w, grown = held(lambda: CSVWriter(tmp_path), log, 3000)
    assert grown < 64_000  # 3,000 rows: ~740 kB held before
    w.purge(1800)  # this writer's rows from step 1800 on go (read back from the file, not from memory)
    w.log_metrics({"loss": -1.0}, 1800)
    w.close()
    row = lambda s: f"{s},{float(s)}," + ("0.5" if s >= 1500 else "")  # noqa: E731
    expected = ["step,loss,lr", *map(row, range(1, 1800)), "1800,-1.0,"]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == expected

    def resume(w, start, stop):  # steps 1700 on; its first row replaces the earlier step 1700 (both hold loss)
        for s in range(1699 + start, 1699 + stop):
            w.log_metrics({"loss": 0.25, "acc": 1.0} if s == 1700 else {"loss": float(s)}, s)

    w, grown = held(lambda: CSVWriter(tmp_path, purge_step=1701), resume, 1000)  # the earlier 1701-1800 go at once
    assert grown < 64_000  # nor the earlier run's 1,700 rows (~1 MB before)
    w.close()
    expected = ["step,loss,lr,acc", *(row(s) + "," for s in range(1, 1700)), "1700,0.25,,1.0"]
    expected += [f"{s},{float(s)},," for s in range(1701, 2699)]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == expected
    assert os.listdir(tmp_path) == ["metrics.csv"]
