"""The output folder protects a long run: one run per folder (lock, no silent mixing), checkpoints
that a kill at any moment leaves resumable, resume that refuses setting changes that would alter
the model or the data order and applies the others, flags checked before any work, clear errors
for a full disk and odd paths, one metrics row per step, and files readable as the umask says."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import generate
import lora
import rehearse
import run_dir
import train
from errors import ConfigError, DataError, need_file
from run_dir import RunDir, complete_checkpoints

ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL = os.path.join(ROOT, "demo", "data", "eval.jsonl")


def rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps(folder):
    return [(r["step"], r["loss"]) for r in rows(folder) if "loss" in r]


def same_adapter(a, b):
    a, b = (load_file(os.path.join(x, "adapter", "adapter_model.safetensors")) for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_never_mixes_with_another_runs_files(tmp_path, run_train):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "4", "--save_every", "2")
    with pytest.raises(ConfigError, match="holds another run .*--resume.*--overwrite"):
        run_train(out, "--max_steps", "4", "--save_every", "2", "--seed", "1")
    assert [s for s, _ in complete_checkpoints(str(out))] == [2, 4]  # untouched
    run_train(out, "--max_steps", "2", "--save_every", "1", "--seed", "1", "--overwrite")
    assert [s for s, _ in complete_checkpoints(str(out))] == [1, 2]  # only the new run's
    assert [s for s, _ in steps(out)] == [1, 2]
    assert json.load(open(out / "config.json"))["seed"] == 1


def test_a_folder_in_use_is_refused_and_free_the_moment_its_holder_dies(tmp_path, run_train):
    """One run per folder: a second is told who holds it. The lock is the holding process's own:
    a child it forked (as a DataLoader worker is) and that outlives it does not keep the folder,
    or a --resume right after a kill (or an out-of-memory kill) would be refused."""
    run = tmp_path / "run"
    code = ("import os, sys, time\nfrom run_dir import RunDir\nrun = RunDir(sys.argv[1])\n"
            "run.claim(False, False)\nchild = os.fork()\n"
            "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print(child, flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on "):
            run_train(run)
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the forked child lives on
        run_train(run, "--max_steps", "1")
    finally:
        holder.kill()
        holder.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_resumes_exactly(tmp_path, run_train, monkeypatch):
    full = tmp_path / "full"
    run_train(full)
    part = tmp_path / "part"
    real_save = torch.save

    def die_at_step_6(obj, path, *a, **k):  # killed while step 6 is written
        if "step_00000006" in str(path):
            raise KeyboardInterrupt
        real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", die_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_train(part)
    monkeypatch.undo()
    assert [s for s, _ in complete_checkpoints(str(part))] == [3]  # the half copy is never picked
    run_train(part, "--resume")
    assert steps(part) == steps(full) and same_adapter(part, full)


def test_a_kill_while_a_checkpoint_is_replaced_leaves_a_complete_copy(tmp_path, monkeypatch):
    run = RunDir(str(tmp_path))
    write = lambda text: lambda folder: open(os.path.join(folder, "x"), "w").write(text)  # noqa: E731
    run.save_checkpoint(6, write("old"))
    real_rename = os.rename

    def die_after_moving_the_old_copy_away(src, dst):
        real_rename(src, dst)
        if os.path.basename(dst).startswith(".old_"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", die_after_moving_the_old_copy_away)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(6, write("new"))
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "checkpoints" / "step_00000006")
    [(step, folder)] = complete_checkpoints(str(tmp_path))
    assert step == 6 and open(os.path.join(folder, "x")).read() == "new"


def test_resuming_an_older_checkpoint_drops_the_abandoned_continuation(tmp_path, run_train, capsys):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "6", "--save_every", "2", "--sample_every", "2",
              "--eval_data", EVAL, "--sample_count", "1", "--sample_max_seconds", "0.2")
    run_train(out, "--resume", str(out / "checkpoints" / "step_00000002"), "--max_steps", "4",
              "--save_every", "2", "--sample_every", "2", "--eval_data", EVAL, "--sample_count", "1",
              "--sample_max_seconds", "0.2", "--lr", "1e-3")
    assert "removed checkpoints/step_00000006, after the resumed step 2" in capsys.readouterr().out
    assert [s for s, _ in complete_checkpoints(str(out))] == [2, 4]
    assert sorted(os.listdir(out / "samples")) == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_model_and_data_changes_and_applies_schedule_changes(tmp_path, run_train,
                                                                           capsys):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "4", "--save_every", "2")
    for flag, value in (("--lora_r", "8"), ("--seed", "1"), ("--batch_size", "1")):
        with pytest.raises(ConfigError, match=rf"{flag} {value} \(checkpoint: .*\) would change the "):
            run_train(out, "--resume", "--max_steps", "6", flag, value)
    capsys.readouterr()
    run_train(out, "--resume", "--max_steps", "6", "--lr", "1e-3")
    log = capsys.readouterr().out
    assert "resume: --lr 0.001 applied (checkpoint: 0.005)" in log
    assert "resume: --max_steps 6 applied (checkpoint: 4)" in log
    c = train.parse(train.TrainConfig, ["--max_steps", "6", "--lr", "1e-3", "--warmup_steps", "2"]).optim
    lrs = {r["step"]: r["lr"] for r in rows(out) if "lr" in r}
    assert lrs[5] == pytest.approx(1e-3 * train.lr_factor(4, c)) and lrs[6] == pytest.approx(
        1e-3 * train.lr_factor(5, c))


BAD_FLAGS = [  # (argv, words of the one-line error)
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--pad_multiple", "0"], "--pad_multiple 0: must be >= 1"),
    (["--fp8"], "--fp8 needs a GPU with FP8 tensor cores (H100 or newer); the device is cpu"),
    (["--grad_accum", "0"], "--grad_accum 0: must be >= 1"),
    (["--lora_r", "0"], "--lora_r 0: must be >= 1"),
    (["--save_every", "0"], "--save_every 0: must be >= 1"),
    (["--log_every", "0"], "--log_every 0: must be >= 1"),
    (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0.0: must be > 0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1.0: must be > 0"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints -1: must be >= 1"),
    (["--max_steps", "-5"], "--max_steps -5: must be >= 1"),
    (["--lora_alpha", "0"], "--lora_alpha 0.0: must be > 0"),
    (["--lora_dropout", "-0.5"], "--lora_dropout -0.5: must be >= 0"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--codebook_weights", "a,b"], "--codebook_weights a,b: must be 8 comma-separated numbers"),
    (["--eval_every", "5", "--eval_data", "", "--train_data", EVAL], "--eval_every 5 needs --eval_data"),
    (["--resume", "--overwrite"], "--resume continues the run in --output_dir and --overwrite"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--warmup_steps", "5", "--lr", "nan"], "--lr nan: must be a finite number"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616: out of range"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
    (["--sample_max_seconds", "inf"], "--sample_max_seconds inf: must be a finite number"),
    (["--lora_targets", "("], "--lora_targets '(': not a regular expression"),
    (["--trainable_modules", "a[b"], "--trainable_modules 'a[b': not a regular expression"),
    (["--codebook_weights", "nan,1,1,1,1,1,1,1"], "--codebook_weights nan,1,1,1,1,1,1,1: must be"),
]


@pytest.mark.parametrize("argv,words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_stop_before_any_work_with_one_line(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        code = train.main(argv + ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
                          if "--device" not in argv else argv + ["--output_dir", str(tmp_path / "out")])
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and words in err, err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "out" / "adapter")


def test_other_commands_check_their_flags(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    checks = [
        (lambda: train.main(["--output_dir", str(tmp_path / "file")]), "is a file"),
        (lambda: generate.main(["--model", "tiny", "--ref_audio", "r.wav", "--ref_text", "Hi.",
                                "--text", " ", "--out", "o.wav"]), "--text: an empty text"),
        (lambda: generate.main(["--model", "tiny", "--temperature", "-1"]),
         "--temperature -1.0: must be >= 0"),
        (lambda: generate.main(["--model", "tiny", "--max_seconds", "inf"]),
         "--max_seconds inf: must be a finite number"),
        (lambda: lora.main(["merge", "--model", "tiny", "--adapter", "a", "--out", "o",
                            "--format", "gguf"]), "--format: invalid choice: 'gguf'"),
        (lambda: lora.main(["merge", "--model", "tiny", "--adapter", str(tmp_path), "--out",
                            str(tmp_path)]), "is not empty"),
        (lambda: rehearse.main(["corpus", str(tmp_path / "c"), "--clips", "0"]),
         "--clips 0: must be >= 1"),
        (lambda: rehearse.main(["corpus", str(tmp_path / "c"), "--lengths", "20,1"]),
         "--lengths 20,1: need shortest,longest"),
        (lambda: rehearse.main(["corpus", "--help"]), "python3 rehearse.py corpus DIR [--clips N]"),
    ]
    for run, words in checks:
        try:
            code = run()
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and words in err, err


def test_a_full_disk_under_safetensors_is_one_line_too(tmp_path, run_train, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConfigError, match=r"writing checkpoint .*\.tmp_step_00000001: no space left"):
        run_train(tmp_path / "run", "--max_steps", "1")


def test_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, run_train, monkeypatch):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "2", "--save_every", "1")

    def full(*a, **k):  # what torch.save says when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 238784 vs 238672")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 10 ** 6))
    with pytest.raises(ConfigError, match=r"writing checkpoint .*\.tmp_step_00000003: no space left on "
                                        r"the device \(1 MiB free\)"):
        run_train(out, "--resume", "--max_steps", "3", "--save_every", "1")
    assert [s for s, _ in complete_checkpoints(str(out))] == [1, 2]
    assert not os.path.exists(out / "checkpoints" / ".tmp_step_00000003")


def test_metrics_hold_one_valid_row_per_step_after_kills_and_half_lines(tmp_path, run_train,
                                                                       kill_after_checkpoint):
    out = tmp_path / "run"
    kill_after_checkpoint(lambda: run_train(out), step=3)
    with open(out / "metrics.jsonl", "a") as f:  # rows of steps past the checkpoint, a half line
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    run_train(out, "--resume")
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_written_files_follow_the_umask(tmp_path, run_train):
    old = os.umask(0o022)
    try:
        run_train(tmp_path / "run", "--max_steps", "1")
        assert lora.main(["merge", "--model", "tiny", "--adapter", str(tmp_path / "run" / "adapter"),
                          "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "run" / "adapter" / "adapter_model.safetensors",
                 tmp_path / "run" / "checkpoints" / "step_00000001" / "adapter" / "adapter_model.safetensors",
                 tmp_path / "merged" / "model.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_paths_say_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(DataError, match="is a folder, not a file"):
        need_file(str(tmp_path / "dir.json"), "x", "fix")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=r"is not readable \(permission denied\)"):
        need_file(str(tmp_path / "f.json"), "x", "fix")
    with pytest.raises(DataError, match="not found"):
        need_file(str(tmp_path / "nope.json"), "x", "fix")


@pytest.mark.slow
def test_the_demo_adapter_merges_and_loads_back_in_both_layouts(tmp_path, run_train, capsys):
    """lora.py merge --model tiny (the demo's model); the merged export in either layout evaluates
    as the base + adapter does, and generates."""
    run_train(tmp_path / "run", "--model", "tiny", "--max_steps", "3")
    adapter = str(tmp_path / "run" / "adapter")

    def evaluate(*model):
        out = tmp_path / f"eval{len(os.listdir(tmp_path))}"
        assert train.main([*model, "--eval_only", "--eval_data", EVAL, "--device", "cpu",
                           "--output_dir", str(out)]) == 0
        return json.load(open(out / "eval.json"))

    want = evaluate("--model", "tiny", "--adapter", adapter)
    for fmt in ("official", "transformers"):
        merged = str(tmp_path / fmt)
        assert lora.main(["merge", "--model", "tiny", "--adapter", adapter, "--out", merged,
                          "--format", fmt]) == 0
        got = evaluate("--model", merged)
        assert got["text_loss"] == pytest.approx(want["text_loss"], rel=1e-5)
        assert got["audio_loss_per_codebook"] == pytest.approx(want["audio_loss_per_codebook"], rel=1e-5)
        assert generate.main(["--model", merged, "--data", EVAL, "--count", "1", "--out_dir",
                              str(tmp_path / f"listen_{fmt}"), "--device", "cpu",
                              "--max_seconds", "0.5"]) == 0
    capsys.readouterr()


def test_scalars_of_a_row_go_to_tensorboard(tmp_path, run_train):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(tmp_path / "run", "--max_steps", "3", "--log_to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == pytest.approx(steps(tmp_path / "run"))
    assert "audio_loss_per_codebook/7" in events.Tags()["scalars"]


def test_a_missing_logger_package_is_one_clear_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    for name in run_dir.LOGGERS:
        with pytest.raises(ConfigError, match=rf"--log_to {name}: the {name} package is not "
                                            rf"installed; `pip install {name}`"):
            run_dir.check_loggers([name])
    with pytest.raises(ConfigError, match="--log_to mlflow: unknown"):
        run_dir.check_loggers(["mlflow"])


@pytest.mark.slow
def test_the_node_rehearsal_runs_every_stage_on_cpu(tmp_path):
    """bash rehearse.sh --tiny: assets, prepare, train killed after a checkpoint, resume, both
    merges evaluating as the adapter does, generation; its last line is the JSON summary."""
    p = subprocess.run(["bash", "rehearse.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, WORK=str(tmp_path / "rehearsal")), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(summary["stages"]) == [
        "assets", "prepare", "train", "resume", "merge_official", "merge_transformers",
        "eval_adapter", "eval_merged_official", "eval_merged_transformers", "generate"]
    assert summary["stages"]["train"]["rc"] == -9  # killed after its checkpoint, as planned
    assert all(s["rc"] == 0 for name, s in summary["stages"].items() if name != "train")
    assert summary["merged_eval_max_abs_diff"] < 1e-4 and summary["checkpoint_mib"] > 0
    assert summary["loading_to_first_step_s"] > 0 and summary["resume_to_first_step_s"] > 0
    assert os.path.isfile(tmp_path / "rehearsal" / "run" / "samples" / "step_00000012" / "sample0.wav")


@pytest.mark.slow
def test_the_rehearsal_kill_takes_down_every_torchrun_worker(tmp_path, tiny_ckpt):
    """rehearse.py stage --kill_when kills torchrun and its workers (in sessions of their own):
    the folder's lock is free at once, and the run resumes to its end; then the report's
    comparison with one process stepping through the same global batches (--grad_accum 2)."""
    import rehearse

    run = tmp_path / "run"
    # 30 steps of ~0.05 s: the kill, at the first complete checkpoint (step 4 or, on a busy
    # machine, a later one), lands mid-run; steps 3 and on of the first process are timed
    flags = ["--model", tiny_ckpt, "--eval_data", "", "--device", "cpu", "--batch_size", "1",
             "--max_steps", "30", "--save_every", "4", "--output_dir", str(run)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", port, os.path.join(ROOT, "train.py")]
    assert rehearse.stage(str(tmp_path), "train", torchrun + flags,
                          kill_when=str(run / "checkpoints" / "step_*" / "COMPLETE")) == 0
    time.sleep(1)
    holder = RunDir(str(run))
    holder.claim(resume=True, overwrite=False)  # would raise if a worker still held the lock
    holder.release()
    assert complete_checkpoints(str(run))[-1][0] < 30
    resumed = time.time()
    assert rehearse.stage(str(tmp_path), "resume", torchrun + flags + ["--resume"]) == 0
    one = tmp_path / "one"
    alone = flags[:-1] + [str(one), "--grad_accum", "2"]
    assert rehearse.stage(str(tmp_path), "one", [sys.executable, os.path.join(ROOT, "train.py")]
                          + alone) == 0
    rows = lambda path: rehearse.rows(str(path / "metrics.jsonl"))  # noqa: E731
    got = rehearse.against_one_gpu(rows(run), rows(one), 2, resumed)
    assert got["scaling_steps"] >= 2 and got["scaling_efficiency"] > 0
    assert got["loss_max_abs_diff_to_one_gpu"] < 1e-4  # fp32: the same batches, the same losses


def test_rehearsal_scaling_is_not_decided_by_one_slow_step_or_a_resumed_process():
    """A step that recompiles in one run alone (here the reference's step 4) must not turn half
    speed into full scaling: the efficiency is a median of per-step ratios. A resumed process
    runs its first, slower steps where the reference runs warm: its steps are not timed."""
    import rehearse

    def run(seconds):
        return [dict(step=s, loss=1.0, step_seconds=t, time=float(s)) for s, t in seconds.items()]
    two_gpus = run({s: 0.3 if s <= 8 else 3.0 for s in range(1, 13)})
    one_gpu = run({s: 30.0 if s == 4 else 0.3 for s in range(1, 13)})
    got = rehearse.against_one_gpu(two_gpus, one_gpu, 2, resumed=8.5)
    assert got["scaling_steps"] == 6 and got["scaling_efficiency"] == pytest.approx(0.5)
    assert got["loss_max_abs_diff_to_one_gpu"] == 0


def test_rehearsal_kill_fires_on_any_matching_checkpoint_and_a_run_that_outlives_it_fails(tmp_path, capsys):
    """The kill watches a glob, so a checkpoint that keep-last deleted between two polls still
    counts (the first one alone was missed on a busy machine); a run that ends unkilled fails the
    stage, since the resume would then rehearse nothing."""
    import rehearse

    marker = tmp_path / "checkpoints" / "step_00000004" / "COMPLETE"
    write_then_wait = [sys.executable, "-c", f"import os, time; os.makedirs({str(marker.parent)!r}); "
                       f"open({str(marker)!r}, 'w').close(); time.sleep(60)"]
    started = time.time()
    glob = str(tmp_path / "checkpoints" / "step_*" / "COMPLETE")
    assert rehearse.stage(str(tmp_path), "train", write_then_wait, kill_when=glob) == 0
    assert time.time() - started < 30
    assert rehearse.stage(str(tmp_path), "train", [sys.executable, "-c", "pass"],
                          kill_when=str(tmp_path / "never" / "*")) == 1
    assert "train ended before" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Nothing lost, nothing mixed: data provenance, damaged checkpoints, values that trace back


def demo_copy(tmp_path):
    """A copy of the demo data whose records and files a test may change."""
    folder = tmp_path / "data"
    shutil.copytree(os.path.join(ROOT, "demo", "data"), folder,
                    ignore=shutil.ignore_patterns(".higgs_index"))
    return folder


def test_resume_refuses_changed_training_data_and_takes_it_with_the_flag(tmp_path, run_train,
                                                                         kill_after_checkpoint,
                                                                         capsys):
    data, out = demo_copy(tmp_path), tmp_path / "run"
    flags = ["--train_data", str(data / "train.jsonl"), "--max_steps", "8", "--save_every", "2"]
    kill_after_checkpoint(lambda: run_train(out, *flags), step=4)
    lines = (data / "train.jsonl").read_text().splitlines()
    edited = [line.replace("assistant", "assistant", 1).replace('"content": "', '"content": "Now, ', 1)
              for line in lines[:20]]
    (data / "train.jsonl").write_text("\n".join(edited) + "\n")
    with pytest.raises(DataError, match=r"changed since the checkpoint .*step_00000004: "
                                        r"20 records edited, 20 records removed; .*--accept_data_change"):
        run_train(out, *flags, "--resume")
    assert [s for s, _ in steps(out)] == [1, 2, 3, 4]  # nothing written
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")  # the records as they were
    os.utime(data / "espeak_f3_00.wav")  # but an audio file touched since
    with pytest.raises(DataError, match=": 1 audio or codes files changed"):
        run_train(out, *flags, "--resume")
    capsys.readouterr()
    run_train(out, *flags, "--resume", "--accept_data_change")
    assert "--accept_data_change: training on changed data (1 audio or codes files changed" in \
        capsys.readouterr().out
    assert [s for s, _ in steps(out)] == list(range(1, 9))


def test_a_checkpoint_of_another_run_is_refused_where_a_run_lives_and_continues_in_a_new_folder(
        tmp_path, run_train):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_train(b, "--seed", "5", "--max_steps", "4", "--save_every", "2", "--keep_checkpoints", "10")
    run_train(a, "--max_steps", "4", "--save_every", "2")
    before = {p: (b / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
    with pytest.raises(ConfigError, match="a checkpoint of another run than the one in --output_dir"):
        run_train(b, "--max_steps", "6", "--resume", str(a / "checkpoints" / "step_00000002"))
    assert {p: (b / p).read_bytes() for p in before} == before
    assert [s for s, _ in complete_checkpoints(str(b))] == [2, 4]
    run_train(c, "--max_steps", "4", "--save_every", "2", "--resume",
              str(a / "checkpoints" / "step_00000002"))
    assert steps(c) == steps(a)[2:]  # a clean continuation: A's steps 3 and 4, nothing of B
    assert json.load(open(c / "config.json"))["run_id"] == json.load(open(a / "config.json"))["run_id"]


def test_resume_where_a_run_has_no_checkpoint_is_refused_naming_overwrite(tmp_path, run_train):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "4", "--save_every", "2")
    shutil.rmtree(out / "checkpoints")
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="holds a run .* but no intact checkpoint .*--overwrite"):
        run_train(out, "--resume", "--seed", "9", "--max_steps", "3")
    assert (out / "metrics.jsonl").read_bytes() == metrics
    run_train(tmp_path / "new", "--resume", "--max_steps", "1")  # an empty folder starts fresh


def test_a_kill_while_a_checkpoint_is_deleted_never_leaves_a_complete_looking_one(tmp_path,
                                                                                 run_train,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "4", "--save_every", "1", "--keep_checkpoints", "4")
    real = shutil.rmtree

    def dies_after_the_first_file(path, *a, **k):  # rmtree's order: the marker may go last
        if not os.path.exists(path):
            return
        files = sorted(f for f in os.listdir(path) if f != run_dir.COMPLETE)
        os.remove(os.path.join(path, files[-1]))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        RunDir(str(out)).keep_last(2)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert [s for s, _ in complete_checkpoints(str(out))] == [2, 3, 4]
    run_train(out, "--resume", "--max_steps", "5")


def test_checkpoint_files_reach_the_disk_before_the_marker(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    run = RunDir(str(tmp_path))
    run.save_checkpoint(3, lambda folder: open(os.path.join(folder, "trainer.pt"), "w").write("x"))
    names = [os.path.basename(p) for p in synced]
    assert names.index("trainer.pt") < names.index(run_dir.COMPLETE)
    assert str(tmp_path / "checkpoints") in synced  # the rename into place, too


@pytest.mark.parametrize("damage", ["trainer.pt", "adapter/adapter_model.safetensors",
                                    "config.json"])
def test_a_damaged_newest_checkpoint_is_named_and_the_resume_goes_on_from_an_intact_one(
        tmp_path, run_train, kill_after_checkpoint, capsys, damage):
    full, out = tmp_path / "full", tmp_path / "run"
    run_train(full, "--save_every", "2")
    kill_after_checkpoint(lambda: run_train(out, "--save_every", "2"), step=4)
    path = out / "checkpoints" / "step_00000004" / damage
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    capsys.readouterr()
    run_train(out, "--resume", "--save_every", "2")
    log = capsys.readouterr().out
    assert f"file {path}" in log and "trying the checkpoint before it" in log
    assert "resumed from" in log and "step_00000002 at step 2" in log
    assert steps(out) == steps(full) and same_adapter(out, full)


def test_weights_that_turn_non_finite_are_never_saved(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["--lr", "1e308", "--max_steps", "4", "--save_every", "1", "--device", "cpu",
                       "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "trained tensors are not finite" in err and "not saved" in err
    assert not os.path.exists(out / "adapter") and complete_checkpoints(str(out)) == []


def test_damaged_adapters_are_one_line_in_every_command(tmp_path, run_train, capsys):
    run_train(tmp_path / "run", "--model", "tiny", "--max_steps", "1")
    adapter = tmp_path / "run" / "adapter"
    good = {n: (adapter / n).read_bytes() for n in os.listdir(adapter)}
    for name, content in (("adapter_model.safetensors", good["adapter_model.safetensors"][:100]),
                          ("adapter_config.json", b"{not json")):
        (adapter / name).write_bytes(content)
        for command in (
                lambda: lora.main(["merge", "--model", "tiny", "--adapter", str(adapter), "--out",
                                   str(tmp_path / "merged")]),
                lambda: generate.main(["--model", "tiny", "--adapter", str(adapter), "--data", EVAL,
                                       "--count", "1", "--out_dir", str(tmp_path / "g"),
                                       "--device", "cpu"]),
                lambda: train.main(["--model", "tiny", "--adapter", str(adapter), "--eval_only",
                                    "--eval_data", EVAL, "--device", "cpu", "--output_dir",
                                    str(tmp_path / "e")])):
            assert command() == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: adapter file {adapter / name}") and \
                len(err.strip().splitlines()) == 1, err
        (adapter / name).write_bytes(good[name])


def test_merge_is_atomic_and_an_adapter_carries_its_base(tmp_path, run_train, monkeypatch, capsys):
    run_train(tmp_path / "run", "--model", "tiny", "--seed", "3", "--max_steps", "2")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run" / "adapter", moved)  # out of its run folder
    real = shutil.copy2

    def full(src, dst, *a, **k):
        raise OSError(28, "No space left on device", dst)

    monkeypatch.setattr(shutil, "copy2", full)
    merged = tmp_path / "merged"
    assert lora.main(["merge", "--model", "tiny", "--adapter", str(moved), "--out", str(merged)]) == 2
    assert "no space left on the device" in capsys.readouterr().err
    assert not merged.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".merged")]
    monkeypatch.setattr(shutil, "copy2", real)
    assert lora.main(["merge", "--model", "tiny", "--adapter", str(moved), "--out", str(merged)]) == 0

    def evaluate(*model):
        out = tmp_path / f"eval{len(os.listdir(tmp_path))}"
        assert train.main([*model, "--eval_only", "--eval_data", EVAL, "--device", "cpu",
                           "--output_dir", str(out)]) == 0
        return json.load(open(out / "eval.json"))["audio_loss"]

    want = evaluate("--model", "tiny", "--adapter", str(tmp_path / "run" / "adapter"))
    assert evaluate("--model", str(merged)) == pytest.approx(want, rel=1e-5)
    assert evaluate("--model", "tiny", "--adapter", str(moved)) == pytest.approx(want, rel=1e-5)


def test_disk_errors_keep_their_path_and_fix(tmp_path, run_train, monkeypatch):
    import errno

    from errors import io_error

    assert "read-only file system" in str(io_error(OSError(errno.EROFS, "x"), "/p", "writing"))
    real_open = open
    out = tmp_path / "run"

    class Full:  # a metrics file on a disk that fills up
        def __init__(self, f):
            self.f, self.name = f, f.name

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k))
                        if str(p).endswith("metrics.jsonl") and m == "a" else real_open(p, m, *a, **k))
    with pytest.raises(ConfigError, match=r"writing .*metrics.jsonl: no space left on the device .*"
                                          r"--resume"):
        run_train(out, "--max_steps", "2")


def test_the_same_file_for_training_and_evaluation_keeps_both_skip_lists(tmp_path, run_train):
    data = demo_copy(tmp_path)
    lines = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines + ['{"messages": []}']) + "\n")
    out = tmp_path / "run"
    run_train(out, "--train_data", str(data / "train.jsonl"), "--eval_data",
              str(data / "train.jsonl"), "--skip_invalid", "--max_steps", "1")
    with open(out / "skipped_records.jsonl") as f:
        listed = [(r["split"], r["index"]) for r in map(json.loads, f)]
    assert listed == [("train", 40), ("eval", 40)]


def test_a_finished_run_resumes_to_nothing_and_a_lower_step_limit_is_refused(tmp_path, run_train,
                                                                             capsys):
    out = tmp_path / "run"
    run_train(out, "--max_steps", "4", "--save_every", "2", "--eval_data", EVAL)
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    run_train(out, "--max_steps", "4", "--save_every", "2", "--eval_data", EVAL, "--resume")
    assert "the run finished at step 4" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(ConfigError, match=r"--max_steps 3 is below the step of the checkpoint .* \(4\)"):
        run_train(out, "--max_steps", "3", "--resume")
