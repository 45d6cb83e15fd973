"""A run's output folder, kept safe across kills, resumes and mistakes:

    OUT/config.json              the run's settings (flag names), compared on resume
    OUT/metrics.jsonl            one JSON object per line: a row per step, eval and sample rows
    OUT/checkpoints/step_N/      adapter/, trainer.pt (optimizer, scheduler, data position, every
                                 rank's RNG state, data fingerprint), config.json, and COMPLETE,
                                 written last
    OUT/adapter/                 the final adapter
    OUT/skipped_records.jsonl    the records --skip_invalid dropped
    OUT/tensorboard/             with --log_to tensorboard (wandb: OUT/wandb, OUT/wandb_id)
    OUT/.lock                    locked (a POSIX lock) by the process writing the run

One run per folder: a fresh run where another run's files are is an error unless --resume or
--overwrite, and a second run while one holds the lock is told who holds it. A checkpoint is
complete only with its COMPLETE marker, written after its files reach the disk (fsync); it
replaces an older one of the same step by renames, and is renamed away before it is deleted, so
a kill or a power loss at any moment leaves a complete copy that resume finds. A damaged one is
reported and the resume goes on from the newest intact one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from errors import ConfigError, UserError, io_error
from lora import copy_adapter_weights, read_adapter, save_adapter

COMPLETE = "COMPLETE"
CHECKPOINT_NAME = re.compile(r"(\.tmp_|\.old_|\.del_)?step_(\d{8})")
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints", "adapter", "samples", "loss.png",
             "skipped_records.jsonl", "tensorboard", "wandb", "wandb_id")


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint, oldest first. Of the copies of one step that
    a kill during a replacement leaves, the final name wins, then the new copy, then the old."""
    root, found = os.path.join(output_dir, "checkpoints"), {}
    rank = {None: 0, ".tmp_": 1, ".old_": 2}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = CHECKPOINT_NAME.fullmatch(name)
        if m and m.group(1) in rank and os.path.isfile(os.path.join(root, name, COMPLETE)):
            step, kind = int(m.group(2)), rank[m.group(1)]
            if step not in found or kind < found[step][0]:
                found[step] = (kind, os.path.join(root, name))
    return sorted((step, folder) for step, (_, folder) in found.items())


def remove(folder: str) -> None:
    """Delete a checkpoint folder safely: renamed to .del_* first (atomic), so a kill during the
    deletion never leaves a folder that looks complete without its files."""
    name = os.path.basename(folder)
    m = CHECKPOINT_NAME.fullmatch(name)
    doomed = os.path.join(os.path.dirname(folder), f".del_step_{m.group(2)}" if m else f".del_{name}")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(folder, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Every file under `folder`, then the folders, on the disk (a power loss loses none)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files + ["."]:
            fsync(os.path.join(root, name))


def scalars(row: dict):
    """(name, number) of every number in a metrics row; a list becomes name/0, name/1, ..."""
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield key, value
        elif isinstance(value, list):
            yield from ((f"{key}/{i}", v) for i, v in enumerate(value) if isinstance(v, (int, float)))


def check_loggers(names: list[str]) -> None:
    """--log_to: known names whose package is installed (before any work starts)."""
    import importlib.util

    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"--log_to {name}: unknown; use tensorboard, wandb or both "
                              "(comma-separated); metrics.jsonl is always written")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--log_to {name}: the {name} package is not installed; `pip "
                              f"install {name}`, or drop --log_to (metrics.jsonl is always written)")


class TensorBoardLog:
    """OUT/tensorboard; a resumed run drops the events after its checkpoint's step."""

    def __init__(self, path: str, resumed_step: int, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(path, "tensorboard"), purge_step=resumed_step + 1)

    def log(self, row: dict) -> None:
        for key, value in scalars(row):
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A wandb run named after the output folder, continued by a resumed run (OUT/wandb_id)."""

    def __init__(self, path: str, resumed_step: int, settings: dict):
        import wandb

        id_file = os.path.join(path, "wandb_id")
        run_id = open(id_file).read().strip() if resumed_step and os.path.isfile(id_file) else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "higgs-lora"),
                              name=os.path.basename(os.path.abspath(path)), dir=path,
                              config=settings, id=run_id, resume="allow")
        with open(id_file, "w") as f:
            f.write(self.run.id)

    def log(self, row: dict) -> None:
        self.run.log(dict(scalars(row)), step=row["step"])

    def close(self) -> None:
        self.run.finish()


LOGGERS = {"tensorboard": TensorBoardLog, "wandb": WandbLog}  # --log_to


class RunDir:
    """The output folder of a run; rank 0 writes, every rank reads checkpoints."""

    def __init__(self, path: str, main: bool = True):
        self.path, self.main, self.lock_file, self.metrics, self.loggers = path, main, None, None, []

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- claiming the folder ----------------------------------------------------------------------
    def claim(self, resume: bool, overwrite: bool) -> None:
        """Lock the folder, and refuse to mix a fresh run into another run's files."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"--output_dir {self.path} is a file; give a folder")
        if not self.main:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self.lock_file = open(os.path.join(self.path, ".lock"), "a+")
        except OSError as e:
            raise io_error(e, self.path, "creating --output_dir")
        try:
            # a POSIX lock belongs to this process alone: the DataLoader workers it forks do not
            # hold it, so it is free the moment this process dies (killed, out of memory)
            fcntl.lockf(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise io_error(e, self.path, "locking --output_dir")
            self.lock_file.seek(0)
            holder = self.lock_file.read().strip() or "another process"
            raise ConfigError(f"--output_dir {self.path} is in use by another run ({holder}); wait "
                              "for it to end, or choose another --output_dir")
        self.lock_file.seek(0)
        self.lock_file.truncate()
        self.lock_file.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.lock_file.flush()
        existing = self.run_files()
        if existing and not resume:
            if not overwrite:
                raise ConfigError(f"--output_dir {self.path} holds another run ("
                                  f"{', '.join(existing)}); continue it with --resume, replace it "
                                  "with --overwrite, or choose another --output_dir")
            for name in existing:
                target = os.path.join(self.path, name)
                shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)

    def run_files(self) -> list[str]:
        return [n for n in RUN_FILES if os.path.exists(os.path.join(self.path, n))]

    def run_id(self) -> str | None:
        """The id config.json gives the run in this folder (a fresh run draws a new one)."""
        try:
            with open(os.path.join(self.path, "config.json")) as f:
                return json.load(f).get("run_id")
        except (OSError, ValueError):
            return None

    @staticmethod
    def new_run_id() -> str:
        return uuid.uuid4().hex[:12]

    def finished_at(self, step: int) -> bool:
        """Whether the run wrote its final adapter at `step` (metrics.jsonl's `finished` row)."""
        path = os.path.join(self.path, "metrics.jsonl")
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as f:
            return any(line.startswith(f'{{"step": {step}, "finished"') for line in f)

    def release(self) -> None:
        """Close everything, quietly: an error here (a full disk again) would hide the one that
        ended the run."""
        if self.metrics:
            try:
                self.metrics.close()
            except OSError:
                pass
            self.metrics = None
        for logger in self.loggers:
            logger.close()
        self.loggers = []
        if self.lock_file:
            self.lock_file.close()  # closing drops the lock
            self.lock_file = None

    # -- settings ---------------------------------------------------------------------------------
    def write_config(self, settings: dict, folder: str | None = None) -> None:
        with open(os.path.join(folder or self.path, "config.json"), "w") as f:
            json.dump(settings, f, indent=2)

    def start(self, settings: dict, step: int, log_to: list[str], resumed: bool, log) -> None:
        """Rank 0, before the first step: config.json, the folder cut back to the resumed step,
        metrics.jsonl opened for appending."""
        if self.main:
            self.write_config(settings)
            if resumed:
                self.cut_back(step, log)
        self.open_metrics(step, log_to, settings)

    # -- metrics.jsonl ----------------------------------------------------------------------------
    def cut_back(self, resumed_step: int, log) -> None:
        """Rank 0, on a resume: the checkpoints and samples of steps after `resumed_step` belong
        to a continuation the resumed run replaces (a kill, or a resume from an older
        checkpoint); left in place, a later --resume would pick them up."""
        if not self.main:
            return
        for sub in ("checkpoints", "samples"):
            root = os.path.join(self.path, sub)
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                m = CHECKPOINT_NAME.fullmatch(name)
                if m and int(m.group(2)) > resumed_step:
                    remove(os.path.join(root, name))
                    log(f"resume: removed {sub}/{name}, after the resumed step {resumed_step}")

    def open_metrics(self, resumed_step: int, log_to: list[str] = (), settings: dict = None) -> None:
        """Rank 0 appends to metrics.jsonl, first cut back to the rows up to `resumed_step` (a
        kill leaves the rows of steps the resumed run repeats, and possibly a half line), and
        sends the same numbers to the `log_to` loggers."""
        if not self.main:
            return
        self.loggers = [LOGGERS[name](self.path, resumed_step, settings or {}) for name in log_to]
        path = os.path.join(self.path, "metrics.jsonl")
        rows = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the half line a full disk or a kill left
                    if row.get("step", 0) <= resumed_step:
                        rows.append(line if line.endswith("\n") else line + "\n")
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(rows)
            os.replace(path + ".tmp", path)
            self.metrics = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise io_error(e, path, "writing")

    def log(self, row: dict) -> None:
        if self.metrics:
            try:
                self.metrics.write(json.dumps(row) + "\n")
                self.metrics.flush()
            except OSError as e:
                raise io_error(e, self.metrics.name, "writing")
        for logger in self.loggers:
            logger.log(row)

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, write) -> str:
        """Rank 0: `write(folder)` fills a temporary folder, its files reach the disk, COMPLETE
        is written last, then the folder is renamed into place (an older copy of the step is
        renamed away first, then removed). Returns the checkpoint folder."""
        root = os.path.join(self.path, "checkpoints")
        final = os.path.join(root, f"step_{step:08d}")
        tmp, old = (os.path.join(root, f".{kind}_step_{step:08d}") for kind in ("tmp", "old"))
        try:
            for stale in (tmp, old):
                remove(stale)
            os.makedirs(tmp)
            write(tmp)
            fsync_tree(tmp)
            open(os.path.join(tmp, COMPLETE), "w").close()
            fsync(os.path.join(tmp, COMPLETE))
            fsync(tmp)
            if os.path.exists(final):
                os.rename(final, old)
            os.rename(tmp, final)
            fsync(root)
            remove(old)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise io_error(e, tmp, "writing checkpoint")
        return final

    def keep_last(self, keep: int) -> None:
        """Remove all but the newest `keep` complete checkpoints, and leftovers of interrupted
        writes."""
        root = os.path.join(self.path, "checkpoints")
        kept = {folder for _, folder in complete_checkpoints(self.path)[-keep:]}
        for name in os.listdir(root):
            folder = os.path.join(root, name)
            if CHECKPOINT_NAME.fullmatch(name) and folder not in kept:
                remove(folder)


# ----------------------------------------------------------------------------------------------
# Training state: what a checkpoint holds, and resuming from one


def save_training_state(run: RunDir, d, position: dict, model, optimizer, scheduler,
                        settings: dict, data: dict) -> str | None:
    """Every rank contributes its RNG state; rank 0 writes the checkpoint of `position` (the
    adapter, trainer.pt and the run's settings) and returns its folder (None elsewhere). `data`:
    the fingerprints of the training data, compared on resume. Non-finite weights are never
    written."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
    if bad:
        raise TrainingStopped(f"step {position['step']}: {len(bad)} trained tensors are not finite "
                              f"(e.g. {bad[0]}); not saved. Lower --lr (or check the data) and "
                              "--resume from the last checkpoint")
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if d.main:
        def write(folder):
            save_adapter(model, os.path.join(folder, "adapter"), settings["model"], settings["seed"])
            torch.save(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            rng=rngs, position=position, data=data),
                       os.path.join(folder, "trainer.pt"))
            run.write_config(settings, folder)
        folder = run.save_checkpoint(position["step"], write)
    if d.world > 1:
        dist.barrier()
    return folder if d.main else None


class TrainingStopped(UserError):
    """Training cannot go on (non-finite steps or weights): the last checkpoint is intact."""


@dataclass
class Checkpoint:
    """A checkpoint read whole: its folder, settings (config.json), trainer.pt and adapter."""
    folder: str
    settings: dict
    trainer: dict
    adapter: dict

    @classmethod
    def read(cls, folder: str) -> "Checkpoint":
        """Raises ConfigError naming the damaged file."""
        path = os.path.join(folder, "config.json")
        try:
            with open(path) as f:
                settings = json.load(f)
            path = os.path.join(folder, "trainer.pt")
            # on the CPU: each rank's optimizer.load_state_dict moves it to its own parameters
            trainer = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, ValueError, RuntimeError, EOFError, KeyError) as e:
            raise ConfigError(f"checkpoint file {path} is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})")
        return cls(folder, settings, trainer, read_adapter(os.path.join(folder, "adapter"))[1])


def find_resume(resume: str, run: RunDir, log) -> Checkpoint | None:
    """The checkpoint to resume from: the folder --resume names, or the newest intact one in
    OUT/checkpoints (a damaged newer one is reported and passed over); None to start fresh.
    Refuses what would mix two runs: a checkpoint of another run into a folder holding a run,
    and a folder holding a run without any checkpoint to continue from."""
    if not resume:
        return None
    if resume != "latest":
        if not os.path.isfile(os.path.join(resume, COMPLETE)):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} "
                              "marker); give a step_N folder, or --resume alone for the newest")
        ckpt = Checkpoint.read(resume)
        outside = os.path.commonpath([os.path.abspath(resume), os.path.abspath(run.path)]) != \
            os.path.abspath(run.path)
        if outside and run.run_files() and run.run_id() != ckpt.settings.get("run_id", "?"):
            raise ConfigError(f"--resume {resume}: a checkpoint of another run than the one in "
                              f"--output_dir {run.path}; resume it into its own folder, or into a "
                              "new --output_dir, where it continues cleanly")
        return ckpt
    for step, folder in reversed(complete_checkpoints(run.path)):
        try:
            return Checkpoint.read(folder)
        except UserError as e:
            log(f"resume: {e}; trying the checkpoint before it")
    if run.run_files():
        raise ConfigError(f"--resume: --output_dir {run.path} holds a run ({', '.join(run.run_files())}) "
                          "but no intact checkpoint to continue from; start it over with "
                          "--overwrite (which deletes it), or choose another --output_dir")
    log("--resume: no checkpoint yet, starting fresh")
    return None


def compare_settings(ckpt: Checkpoint, now: dict, kinds: dict, log) -> None:
    """A setting of kind "fixed" (it changes the model or the data order) must equal the
    checkpoint's; one of kind "applied" may change, and is named in the log."""
    saved = ckpt.settings
    changed = [(name, saved.get(name), value) for name, value in now.items()
               if kinds.get(name) and saved.get(name, value) != value]
    fixed = [f"--{n} {v} (checkpoint: {old})" for n, old, v in changed if kinds[n] == "fixed"]
    if fixed:
        raise ConfigError(f"--resume {ckpt.folder}: {', '.join(fixed)} would change the model or "
                          "the data order of the run; resume with the checkpoint's values, or "
                          "start a new run in another --output_dir")
    for n, old, v in changed:
        log(f"resume: --{n} {v} applied (checkpoint: {old})")


def restore_training_state(ckpt: Checkpoint, model, optimizer, scheduler, rank: int) -> dict:
    """Adapter, optimizer, scheduler and this rank's RNG state of a checkpoint; its position."""
    copy_adapter_weights(model, ckpt.adapter, ckpt.folder)
    optimizer.load_state_dict(ckpt.trainer["optimizer"])
    scheduler.load_state_dict(ckpt.trainer["scheduler"])
    set_rng_state(ckpt.trainer["rng"][rank])
    return ckpt.trainer["position"]


def write_skipped(output_dir: str, path: str, split: str, invalid: list) -> None:
    """OUT/skipped_records.jsonl: the dropped records of `path` read as `split` (train or eval;
    the rows of other data and splits are kept)."""
    out = os.path.join(output_dir, "skipped_records.jsonl")
    os.makedirs(output_dir, exist_ok=True)
    kept = []
    if os.path.isfile(out):
        with open(out, encoding="utf-8") as f:
            kept = [line for line, row in ((line, json.loads(line)) for line in f)
                    if (row["data"], row.get("split")) != (path, split)]
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(kept + [json.dumps({"data": path, "split": split, "index": x.index,
                                         "source": x.source, "reason": x.reason}) + "\n"
                             for x in invalid])
    print(f"{path}: skipped {len(invalid)} invalid records, listed in {out}", flush=True)


def plot_metrics(output_dir: str) -> None:
    """loss.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(pip install matplotlib for a loss plot; metrics are in {output_dir}/metrics.jsonl)")
        return
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "text_loss", "audio_loss"):
        steps = [r for r in rows if key in r]
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=key)
    evals = [r for r in rows if "eval_audio_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_audio_loss"] for r in evals], "o-",
                label="eval audio_loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.savefig(os.path.join(output_dir, "loss.png"), dpi=100)
