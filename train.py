"""LoRA fine-tuning and evaluation of Higgs-Audio v2 with raw torch.distributed (DDP).

    python train.py                                  # the demo: tiny model, bundled data
    python train.py --model CKPT --train_data train.jsonl --eval_data eval.jsonl --output_dir OUT
    torchrun --nproc_per_node 8 train.py ...        # or: bash launch.sh ...
    python train.py --model CKPT --eval_data FILE --eval_only --output_dir OUT

Every field of TrainConfig is a flag of the same name (`python train.py --help` lists them with
their units and defaults). run_dir.py says what a run writes to its output folder. `train` sets a
run up in named steps; `fit` is the training loop.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from cli import flat, leaves, option, parse
from collate import Collator
from data import Dataset, Fingerprint, Spec, open_dataset
from device import Dist, autocast, init_distributed, local_rank, resolve_device
from errors import ConfigError, DataError, UserError
from formats import invalid_summary
from fp8 import SCALINGS, check_fp8, use_fp8
from listen import ListenConfig, Listener
from lora import (LoRAConfig, count_parameters, describe_lora, inject_lora, load_adapter, load_base,
                  save_adapter)
from loss import LossConfig, Objective, Sums
from run_dir import (RunDir, TrainingStopped, check_loggers, compare_settings, find_resume,
                     plot_metrics, restore_training_state, save_training_state, write_skipped)

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "data")
GROUP_WINDOW = 64  # steps per window of length-sorted samples (--group_by_length)
H100_BF16_TFLOPS = 989.0  # dense peak, for MFU


@dataclass
class DataConfig:
    """data"""
    train_data: str = option(os.path.join(DEMO, "train.jsonl"), "training data: a JSON / JSONL file "
                             "(ChatML, flat, ms-swift, ShareGPT), a metadata.csv or a folder of clips",
                             on_resume="fixed")
    eval_data: str = option("", "evaluation data, any format, may be text-only; none: no evaluation "
                            "(the demo evaluates on demo/data/eval.jsonl)", on_resume="applied")
    max_seq_len: int = option(4096, "longest sample, in positions after audio expansion; longer "
                              "records are invalid", min=16, max=1 << 20, on_resume="fixed")
    skip_invalid: bool = option(False, "drop invalid records (listed in OUT/skipped_records.jsonl) "
                                "instead of stopping", on_resume="fixed")
    accept_data_change: bool = option(False, "--resume even though the training data changed since "
                                      "the checkpoint (the change is logged)")
    group_by_length: bool = option(True, "batch samples of similar expanded length (less padding)",
                                   on_resume="fixed")
    num_workers: int = option(-1, "background collation processes; -1: 2 on GPU, 0 on CPU", min=-1,
                              max=64)


@dataclass
class OptimConfig:
    """optimisation: AdamW (fp32 state), linear warm-up, then cosine decay"""
    max_steps: int = option(100, "optimizer steps to train", min=1, on_resume="applied")
    batch_size: int = option(4, "samples per GPU per micro-batch", min=1, max=4096, on_resume="fixed")
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, max=4096, on_resume="fixed")
    lr: float = option(3e-3, "peak learning rate", above=0, on_resume="applied")
    min_lr_ratio: float = option(0.1, "the cosine decays to lr * min_lr_ratio", min=0, max=1,
                                 on_resume="applied")
    warmup_steps: int = option(5, "steps of linear warm-up", min=0, on_resume="applied")
    weight_decay: float = option(0.0, "AdamW weight decay", min=0, on_resume="applied")
    max_grad_norm: float = option(1.0, "gradients are clipped to this global norm", above=0,
                                  on_resume="applied")
    max_bad_steps: int = option(3, "consecutive non-finite steps (skipped) before the run stops",
                                min=1, on_resume="applied")


@dataclass
class SpeedConfig:
    """device, speed and memory"""
    device: str = option("auto", "auto: cuda when a GPU is present, else cpu",
                         choices=("auto", "cpu", "cuda"), on_resume="applied")
    dtype: str = option("auto", "weights and compute: auto is bfloat16 (autocast, fp32 LoRA "
                        "masters) on GPU, float32 on CPU", choices=("auto", "bfloat16", "float32"),
                        on_resume="applied")
    compile: bool = option(False, "torch.compile each layer (about a minute of compilation, then "
                           "the fastest steps)")
    compile_memory_budget: float = option(1.0, "with --compile: below 1 recomputes more in backward "
                                          "to hold fewer activations", above=0, max=1)
    compile_cpp_wrapper: bool = option(False, "with --compile: launch kernels from C++ (helps small "
                                       "batches on a slow host; doubles compilation time)")
    activation_checkpointing: bool = option(False, "recompute each layer in backward: less memory, "
                                            "about 1/3 slower")
    peak_tflops: float = option(0.0, "per-GPU peak bf16 TFLOP/s for MFU; 0: 989 (H100) on GPU, "
                                "no MFU on CPU", min=0)
    pad_multiple: int = option(8, "pad each batch's length up to a multiple of N: on a GPU each "
                               "new length costs extra the first time, padding costs every time",
                               min=1, max=4096, on_resume="applied")
    fp8: bool = option(False, "the frozen base linears' GEMMs in FP8 (H100 or newer; not exact: "
                       "README Performance)", on_resume="applied")
    fp8_scaling: str = option("rowwise", "with --fp8: a scale per row, or one per tensor",
                              choices=SCALINGS, on_resume="applied")


@dataclass
class RunConfig:
    """output folder, checkpoints and logging"""
    output_dir: str = option("runs/demo", "output folder (run_dir.py lists what it holds)")
    resume: str = option("", "continue from the newest intact checkpoint in OUT/checkpoints "
                         "(--resume alone) or from a checkpoint folder; a checkpoint of another "
                         "run is refused where --output_dir holds a run, and continues cleanly "
                         "in a new folder", const="latest")
    overwrite: bool = option(False, "start fresh in an --output_dir that holds another run, "
                             "deleting its files")
    save_every: int = option(20, "checkpoint every N steps (and at the end)", min=1,
                             on_resume="applied")
    keep_checkpoints: int = option(3, "newest checkpoints kept", min=1, on_resume="applied")
    eval_every: int = option(0, "evaluate every N steps; 0: only at the end", min=0,
                             on_resume="applied")
    log_every: int = option(5, "progress line every N steps (metrics.jsonl gets every step)", min=1,
                            on_resume="applied")
    log_to: str = option("", "also send metrics.jsonl's numbers to tensorboard (OUT/tensorboard), "
                         "wandb, or both (comma-separated); each needs its package",
                         on_resume="applied")

    def loggers(self) -> list[str]:
        return [n.strip() for n in self.log_to.split(",") if n.strip()]


@dataclass
class TrainConfig:
    """LoRA fine-tuning of Higgs-Audio v2"""
    model: str = option("tiny", "base checkpoint: a folder (official or transformers layout, with "
                        "its tokenizer), a Hugging Face Hub id, or tiny (a random demo model)",
                        on_resume="fixed")
    seed: int = option(0, "seed of the LoRA init, dropout, data order (and the tiny model)",
                       min=0, max=2 ** 32 - 1, on_resume="fixed")
    eval_only: bool = option(False, "only evaluate --model (+ --adapter) on --eval_data, writing "
                             "OUT/eval.json")
    adapter: str = option("", "with --eval_only: an adapter folder to evaluate with the model")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)

    def eval_path(self) -> str:
        """--eval_data, or the demo's eval set when training on the demo."""
        if self.data.eval_data or self.data.train_data != os.path.join(DEMO, "train.jsonl"):
            return self.data.eval_data
        return os.path.join(DEMO, "eval.jsonl")

    def global_batch(self, world: int) -> int:
        """Samples per optimizer step over every rank."""
        return self.optim.batch_size * self.optim.grad_accum * world

    def check(self) -> None:
        """Flags that only make sense together, and regexes (bounds are checked when parsing)."""
        if self.run.eval_every and not self.eval_path():
            raise ConfigError(f"--eval_every {self.run.eval_every} needs --eval_data FILE")
        if self.listen.sample_data and not self.listen.sample_every:
            raise ConfigError("--sample_data is read by --sample_every N; add it")
        if self.listen.sample_every and not (self.listen.sample_data or self.eval_path()):
            raise ConfigError("--sample_every needs prompts: --sample_data FILE, or --eval_data "
                              "FILE (its first --sample_count records)")
        if self.adapter and not self.eval_only:
            raise ConfigError("--adapter is read by --eval_only (training starts a new adapter; "
                              "continue a run with --resume)")
        if self.eval_only and not self.eval_path():
            raise ConfigError("--eval_only needs --eval_data FILE")
        if self.run.resume and self.run.overwrite:
            raise ConfigError("--resume continues the run in --output_dir and --overwrite deletes "
                              "it; give one of them")
        self.lora.check()
        check_loggers(self.run.loggers())


# ----------------------------------------------------------------------------------------------
# Data


def load_data(path: str, tokenizer, model_cfg, cfg: TrainConfig, d: Dist = Dist(),
              split: str = "train") -> Dataset:
    """The validated samples of a data file or folder, as `python data.py check` validates them:
    an invalid record stops the run with every reason listed, or with --skip_invalid is dropped
    and listed in OUT/skipped_records.jsonl. Training data must have trained assistant audio.
    Rank 0 validates (or reuses the index) first; a failure stops every rank with its message."""
    spec = Spec(model_cfg, tokenizer, cfg.data.max_seq_len, require_audio=split == "train")
    shared = [None, None]  # rank 0's error, or its index folder and fingerprint
    if d.main:
        try:
            dataset = open_dataset(path, spec)
            if dataset.invalid and not cfg.data.skip_invalid:
                raise DataError(invalid_summary(path, dataset.invalid, len(dataset.hashes)) +
                                "\nfix them (`python data.py check` reports them all), or pass "
                                "--skip_invalid to train without them")
            if dataset.invalid:
                write_skipped(cfg.run.output_dir, path, split, dataset.invalid)
            if not len(dataset):
                raise DataError(f"{path}: no valid records")
            shared = [None, (dataset.folder, dataset.meta["media"])]
        except UserError as e:
            shared = [str(e), None]
    if d.world > 1:
        dist.broadcast_object_list(shared)
    if shared[0] is not None:
        raise DataError(shared[0])
    if d.main:
        return dataset
    folder, media = shared[1]  # rank 0's index, if this rank sees rank 0's disk
    if os.path.isfile(os.path.join(folder, "meta.json")):
        dataset = Dataset(folder, spec)
        if dataset.meta["media"] == media:
            return dataset
    return open_dataset(path, spec, log=lambda _: None)


def step_indices(n: int, global_batch: int, seed: int, epoch: int,
                 lengths=None) -> list[list[int]]:
    """The sample indices of each global step of an epoch (the incomplete tail is dropped).
    With `lengths`, samples are sorted by expanded length within windows of GROUP_WINDOW steps
    and the steps are then shuffled: batches of similar length waste little padding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).numpy()
    if lengths is not None:
        window, lengths = global_batch * GROUP_WINDOW, np.asarray(lengths)
        perm = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                               for w in np.split(perm, range(window, n, window))])
    steps = [perm[i:i + global_batch].tolist() for i in range(0, n - global_batch + 1, global_batch)]
    if lengths is not None:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
    return steps


def micro_batches(step: list[int], d: Dist, batch_size: int, lengths=None) -> list[list[int]]:
    """This rank's micro-batches of a global step. Sorted by length and dealt out to the ranks
    back and forth (0, 1, 1, 0, ...), every rank gets a like share of the tokens (none waits for
    another) and every micro-batch samples of like length (little padding)."""
    if lengths is not None:
        step = sorted(step, key=lambda i: lengths[i])
        rounds = [step[k:k + d.world] for k in range(0, len(step), d.world)]
        step = [i for k, turn in enumerate(rounds) for i in (turn if k % 2 == 0 else turn[::-1])]
    mine = step[d.rank::d.world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def step_batches(dataset: Dataset, collator, cfg: TrainConfig, d: Dist, epoch: int, start: int,
                 pin: bool):
    """(epoch, steps done in that epoch, this rank's collated micro-batches) for every step from
    step `start` of `epoch` on, epoch after epoch; background processes read and collate ahead."""
    from torch.utils.data import DataLoader

    lengths = np.asarray(dataset.lengths) if cfg.data.group_by_length else None
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else (2 if pin else 0)
    while True:
        jobs = [micro_batches(s, d, cfg.optim.batch_size, lengths) for s in step_indices(
            len(dataset), cfg.global_batch(d.world), cfg.seed, epoch, lengths)[start:]]
        loader = DataLoader(jobs, batch_size=None, num_workers=workers, pin_memory=pin,
                            collate_fn=partial(collate_step, collator, dataset),
                            prefetch_factor=4 if workers else None,
                            # its own generator: creating the iterator must not draw from the
                            # global RNG (dropout), or a resumed run would diverge
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i, batches in enumerate(loader, start + 1):
            yield epoch, i, batches
        epoch, start = epoch + 1, 0


def collate_step(collator, dataset, job: list[list[int]]) -> list:
    return [collator([dataset[i] for i in mb]) for mb in job]


# ----------------------------------------------------------------------------------------------
# Model and optimizer


class TrainingForward(torch.nn.Module):
    """Model + objective in one forward, so DDP sees every trainable parameter (heads included)
    in the graph of its output."""

    def __init__(self, model, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch):
        return self.objective.sums(self.model, self.model(batch), batch)


def data_parallel(model, objective: Objective, device, world: int) -> torch.nn.Module:
    """Model + objective, under DDP when there are several ranks (bench.py times this module)."""
    module = TrainingForward(model, objective)
    if world == 1:
        return module
    # every adapter is in every forward (the audio FFN runs even on no rows), so no search for
    # unused parameters, except for a trained Whisper tower, which only some batches use
    tower = any(p.requires_grad for n, p in model.named_parameters()
                if n.startswith(("audio_tower.", "audio_encoder_proj.")))
    # layers are compiled one by one; Dynamo's split at bucket edges fails on dynamic shapes
    torch._dynamo.config.optimize_ddp = False
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=tower, broadcast_buffers=False,  # RoPE buffers never change
        bucket_cap_mb=100, gradient_as_bucket_view=True)


def add_lora(model, cfg: TrainConfig, log) -> list:
    """Inject the adapters (the same init on every rank), compile if asked; trainable params."""
    torch.manual_seed(cfg.seed)
    c = cfg.lora
    inject_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, c.trainable_modules)
    log(describe_lora(model))
    if cfg.speed.fp8:
        log(f"fp8: {use_fp8(model, cfg.speed.fp8_scaling)} frozen linears run their GEMMs in FP8 "
            f"({cfg.speed.fp8_scaling} scales)")
    model.activation_checkpointing = cfg.speed.activation_checkpointing
    if cfg.speed.compile:
        model.compile_layers(cfg.speed.compile_memory_budget, cpp_wrapper=cfg.speed.compile_cpp_wrapper)
    trainable, total = count_parameters(model)
    log(f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)")
    return [p for p in model.parameters() if p.requires_grad]


def lr_factor(step: int, c: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list, c: OptimConfig, device):
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay,
                                  fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, c=c))


def apply_optim_settings(optimizer, scheduler, c: OptimConfig) -> None:
    """After a resume: this run's learning rate and weight decay, not the checkpoint's (the
    schedule's other settings are read by lr_factor anyway)."""
    scheduler.base_lrs = [c.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(weight_decay=c.weight_decay, initial_lr=c.lr,
                     lr=c.lr * lr_factor(scheduler.last_epoch, c))


def step_flops(model, batch) -> float:
    """Training FLOPs of one micro-batch, LoRA style: 4 x frozen matmul params active per position
    (attention + one FFN; heads only where computed; no frozen weight gradients) + 6 x active
    LoRA params + causal attention scores."""
    c = model.cfg
    D, hd = c.hidden_size, c.head_dim
    attn = D * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
    positions = float(batch.attention_mask.sum())
    frozen = c.num_layers * (attn + 3 * D * c.intermediate_size) * positions
    frozen += D * c.vocab_size * batch.text_logit_index.numel()
    frozen += D * c.audio_num_codebooks * c.codebook_rows * batch.audio_logit_rows.numel()
    n_audio = float(batch.audio_index.numel())
    lora = sum(p.numel() * (n_audio if ".audio_mlp." in name else
                            positions - n_audio if ".mlp." in name else positions)
               for name, p in model.named_parameters() if p.requires_grad)
    lengths = batch.attention_mask.sum(1).float()
    scores = 12 * c.num_layers * c.num_heads * hd * float((lengths ** 2).sum()) / 2
    return 4 * frozen + 6 * lora + scores


# ----------------------------------------------------------------------------------------------
# Set-up: named steps, each returning what it makes


@dataclass
class Training:
    """What `train` sets up and `fit` runs."""
    cfg: TrainConfig
    d: Dist
    device: torch.device
    amp: object  # the autocast context of a forward
    run: RunDir
    settings: dict  # config.json: every flag, the world size and the run id
    objective: Objective
    train_data: Dataset
    eval_data: Dataset | None
    collator: Collator
    listener: Listener | None
    model: torch.nn.Module
    module: torch.nn.Module  # model + objective, under DDP with several ranks
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    position: dict  # step, epoch, step_in_epoch
    log: object

    def due(self, every: int, step: int) -> bool:
        return bool(every) and step % every == 0


@contextmanager
def started(cfg: TrainConfig):
    """Flags checked, then (Dist, device, dtype); the process group is closed however it ends."""
    cfg.check()
    device, dtype = resolve_device(cfg.speed.device, cfg.speed.dtype, local_rank())
    if cfg.speed.fp8:
        check_fp8(device, dtype)
    d = init_distributed(device)
    try:
        yield d, device, dtype
        if d.world > 1:  # ranks leave together: one that tears gloo down while rank 0 still
            # writes the adapter can abort ("terminate called without an active exception")
            dist.barrier()
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def train(cfg: TrainConfig, base=None) -> dict:
    """A training run: set up in named steps, then the loop; `base`: the base model, if not
    loaded from --model (bench.py times a random one)."""
    with started(cfg) as (d, device, dtype), RunDir(cfg.run.output_dir, d.main) as run:
        # no reference to the set-up outlives fit: DDP must go before its process group
        return fit(setup(cfg, d, device, dtype, run, base))


def setup(cfg: TrainConfig, d: Dist, device, dtype, run: RunDir, base=None) -> Training | None:
    """Everything a run needs, data checked before any weights are read; None if the run being
    resumed has already finished."""
    log = (lambda msg: print(msg, flush=True)) if d.main else (lambda msg: None)
    run.claim(resume=bool(cfg.run.resume), overwrite=cfg.run.overwrite)
    tokenizer, model_cfg = checkpoint.model_spec(cfg.model)
    objective = Objective(model_cfg, cfg.loss)
    ckpt = resume_point(cfg, run, d, log)
    if ckpt and ckpt.trainer["position"]["step"] == cfg.optim.max_steps and \
            run.finished_at(cfg.optim.max_steps):
        log(f"the run finished at step {cfg.optim.max_steps} (its adapter is in "
            f"{os.path.join(run.path, 'adapter')}); raise --max_steps to train on")
        return None
    settings = dict(flat(cfg), world_size=d.world,
                    run_id=ckpt.settings.get("run_id") if ckpt else RunDir.new_run_id())
    if ckpt:
        kinds = {f.name: f.metadata.get("on_resume") for _, f, _ in leaves(TrainConfig)}
        compare_settings(ckpt, settings, dict(kinds, world_size="fixed"), log)
    train_data = load_data(cfg.data.train_data, tokenizer, model_cfg, cfg, d)
    if ckpt:
        check_data_unchanged(ckpt, train_data.fingerprint, cfg, log)
    eval_path = cfg.eval_path()
    eval_data = load_data(eval_path, tokenizer, model_cfg, cfg, d, "eval") if eval_path else None
    check_batch_fits(train_data, cfg, d)
    listener = Listener(cfg.listen, cfg.listen.sample_data or eval_path, tokenizer, model_cfg,
                        cfg.seed, device, d.main) if cfg.listen.sample_every else None
    model = base or checkpoint.load(cfg.model, device, dtype, cfg.seed)
    params = add_lora(model, cfg, log)
    model.train()
    torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # distinct dropout masks per rank
    module = data_parallel(model, objective, device, d.world)
    optimizer, scheduler = make_optimizer(params, cfg.optim, device)
    position = dict(step=0, epoch=0, step_in_epoch=0)
    if ckpt:
        position = restore_training_state(ckpt, model, optimizer, scheduler, d.rank)
        apply_optim_settings(optimizer, scheduler, cfg.optim)
        log(f"resumed from {ckpt.folder} at step {position['step']}")
    run.start(settings, position["step"], cfg.run.loggers(), resumed=bool(ckpt), log=log)
    collator = Collator(model_cfg, cfg.speed.pad_multiple)
    return Training(cfg, d, device, partial(autocast, device, dtype), run, settings, objective,
                    train_data, eval_data, collator, listener, model, module, params, optimizer,
                    scheduler, position, log)


def resume_point(cfg: TrainConfig, run: RunDir, d: Dist, log):
    """The checkpoint this run continues from (None: a fresh run). Rank 0 decides, so that every
    rank resumes from the same step (--output_dir is shared); every rank then reads it."""
    ckpt, folder = None, [None]
    if d.main:
        ckpt = find_resume(cfg.run.resume, run, log)
        folder = [ckpt.folder if ckpt else None]
    if d.world > 1:
        dist.broadcast_object_list(folder)
    if not d.main and folder[0]:
        ckpt = find_resume(folder[0], run, log)
    if ckpt and ckpt.trainer["position"]["step"] > cfg.optim.max_steps:
        raise ConfigError(f"--max_steps {cfg.optim.max_steps} is below the step of the checkpoint "
                          f"{ckpt.folder} ({ckpt.trainer['position']['step']}); give a larger "
                          "--max_steps, or --resume an earlier checkpoint folder")
    return ckpt


def check_data_unchanged(ckpt, now: Fingerprint, cfg: TrainConfig, log) -> None:
    """The training data must be what the checkpoint trained on, unless --accept_data_change."""
    data = ckpt.trainer.get("data")
    if data is None:  # a checkpoint of an earlier version
        return
    change = now.change_from(Fingerprint(**data))
    if change and not cfg.data.accept_data_change:
        raise DataError(f"--train_data {cfg.data.train_data} changed since the checkpoint "
                        f"{ckpt.folder}: {change}; restore it to resume exactly, or pass "
                        "--accept_data_change to go on with the new data (the order of the "
                        "remaining steps changes)")
    if change:
        log(f"resume: --accept_data_change: training on changed data ({change})")


def check_batch_fits(train_data: Dataset, cfg: TrainConfig, d: Dist) -> None:
    if len(train_data) < cfg.global_batch(d.world):
        raise ConfigError(f"{cfg.data.train_data}: {len(train_data)} records, fewer than one global "
                          f"batch (--batch_size {cfg.optim.batch_size} x --grad_accum "
                          f"{cfg.optim.grad_accum} x {d.world} GPUs)")


# ----------------------------------------------------------------------------------------------
# The training loop


def fit(t: Training | None) -> dict:
    """Train from t.position to --max_steps: one optimizer step per iteration (None: nothing to
    train)."""
    if t is None:
        return {}
    cfg, d, c = t.cfg, t.d, t.cfg.optim
    batches = step_batches(t.train_data, t.collator, cfg, d, t.position["epoch"],
                           t.position["step_in_epoch"], pin=t.device.type == "cuda")
    step, bad_steps, started, row = t.position["step"], 0, time.time(), {}
    while step < c.max_steps:
        t0 = time.time()
        epoch, in_epoch, micro = next(batches)  # this rank's micro-batches of the step
        # each micro-batch's loss is divided by the whole step's counts (all micro-batches, all
        # ranks), so the gradient does not depend on how the step is split
        counts = sum((t.objective.counts(b) for b in micro[1:]), t.objective.counts(micro[0]))
        counts = counts.to(t.device).all_reduced() if d.world > 1 else counts.to(t.device)
        sums = None
        for i, batch in enumerate(b.to(t.device) for b in micro):
            last = i == len(micro) - 1  # DDP all-reduces the gradients in the last backward
            with (nullcontext() if last or d.world == 1 else t.module.no_sync()), t.amp():
                s = t.module(batch)
                # DDP averages the ranks' gradients, but the objective is their sum: * world
                loss = t.objective.loss(s, counts) * d.world
            loss.backward()
            sums = s.detach() if sums is None else sums + s.detach()
        flops = sum(step_flops(t.model, b) for b in micro)  # on the host, while the GPU works
        grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, c.max_grad_norm))
        metrics = t.objective.metrics(sums.all_reduced() if d.world > 1 else sums)
        # loss and gradient norm are all-reduced: every rank takes the same branch
        if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
            t.optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            t.log(f"step {step + 1}: non-finite loss or gradient (loss {metrics['loss']}, grad "
                  f"norm {grad_norm}); step skipped ({bad_steps}/{c.max_bad_steps}). Lower --lr or "
                  "check the data.")
        t.optimizer.zero_grad(set_to_none=True)
        lr = t.optimizer.param_groups[0]["lr"]  # the one this step used
        t.scheduler.step()
        if bad_steps >= c.max_bad_steps:
            raise SystemExit(f"stopping: {bad_steps} consecutive non-finite steps")
        step += 1
        row = dict(step=step, epoch=epoch, **metrics, lr=lr, grad_norm=grad_norm,
                   **speed(time.time() - t0, micro, metrics, flops, t), time=time.time())
        t.run.log(row)
        if step % cfg.run.log_every == 0 or step == c.max_steps:
            eta = (time.time() - started) / (step - t.position["step"]) * (c.max_steps - step)
            t.log(progress_line(row, c.max_steps, eta))
        last = step == c.max_steps
        if t.eval_data and t.due(cfg.run.eval_every, step) and not last:
            evaluate_and_log(t, step)
        if t.listener and (t.due(t.listener.every, step) or last):
            listen(t, step)
        if t.due(cfg.run.save_every, step) or last:
            checkpoint_state(t, dict(step=step, epoch=epoch, step_in_epoch=in_epoch))
    if t.eval_data:
        row.update({f"eval_{k}": v for k, v in evaluate_and_log(t, step, "final eval").items()})
    if t.d.main:
        save_adapter(t.model, os.path.join(t.run.path, "adapter"), cfg.model, cfg.seed)
        t.run.log(dict(step=step, finished=True))
        plot_metrics(t.run.path)
        t.log(f"adapter written to {os.path.join(t.run.path, 'adapter')}")
    return row


def speed(seconds: float, micro: list, metrics: dict, flops: float, t: Training) -> dict:
    """Throughput figures of a step (positions: rank 0's times the number of ranks; flops: one
    rank's, as MFU is the same on every rank), and rank 0's padded lengths and padding."""
    peak = t.cfg.speed.peak_tflops or (H100_BF16_TFLOPS if t.device.type == "cuda" else 0.0)
    frames = metrics["num_audio_tokens_per_codebook"][0]
    positions = sum(float(b.attention_mask.sum()) for b in micro)
    return dict(step_seconds=seconds, positions_per_s=positions * t.d.world / seconds,
                padding=1 - positions / sum(b.attention_mask.numel() for b in micro),
                batch_lengths=[b.attention_mask.shape[1] for b in micro],
                audio_seconds_per_s=frames / 25 / seconds,
                mfu=flops / seconds / (peak * 1e12) if peak else None,
                peak_memory_gib=torch.cuda.max_memory_allocated(t.device) / 2 ** 30
                if t.device.type == "cuda" else None)


def progress_line(m: dict, max_steps: int, eta: float) -> str:
    per_cb = " ".join(f"{x:.2f}" for x in m["audio_loss_per_codebook"])
    extra = "".join(f" {name} {fmt(m[key])}" for name, key, fmt in (
        ("voice", "voice_loss", "{:.4f}".format), ("mfu", "mfu", "{:.1%}".format),
        ("mem", "peak_memory_gib", "{:.1f}GiB".format)) if m.get(key) is not None)
    return (f"step {m['step']}/{max_steps} loss {m['loss']:.4f} text {m['text_loss']:.4f} audio "
            f"{m['audio_loss']:.4f} [{per_cb}] lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
            f"{m['positions_per_s']:.0f} pos/s {m['audio_seconds_per_s']:.1f} audio-s/s{extra} "
            f"eta {eta:.0f}s")


def evaluate_and_log(t: Training, step: int, what: str = "eval") -> dict:
    ev = evaluate(t.model, t.eval_data, t.collator, t.cfg.optim.batch_size, t.device, t.d, t.amp)
    t.run.log(dict(step=step, **{f"eval_{k}": v for k, v in ev.items()}))
    t.log(f"{what} step {step}: text {ev['text_loss']:.4f} audio {ev['audio_loss']:.4f}")
    return ev


def listen(t: Training, step: int) -> None:
    """Rank 0 generates and checks samples; the other ranks wait for it."""
    if t.d.main:
        for row in t.listener(t.model, step, t.run.path):
            t.run.log(row)
    if t.d.world > 1:
        dist.barrier()


def checkpoint_state(t: Training, position: dict) -> None:
    started = time.time()
    folder = save_training_state(t.run, t.d, position, t.model, t.optimizer, t.scheduler,
                                 t.settings, t.train_data.fingerprint.state())
    if folder:
        size = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(folder) for f in files)
        t.run.log(dict(step=position["step"], checkpoint_seconds=time.time() - started,
                       checkpoint_mib=size / 2 ** 20))
        t.run.keep_last(t.cfg.run.keep_checkpoints)


@torch.no_grad()
def evaluate(model, samples, collator: Collator, batch_size: int, device, d: Dist = Dist(),
             amp=nullcontext) -> dict:
    """Token-weighted losses over all samples, sharded over ranks and all-reduced: the same for
    any batch size or world size."""
    was_training = model.training
    model.eval()
    objective, total = Objective(model.cfg), None
    mine = list(range(d.rank, len(samples), d.world))
    for start in range(0, len(mine), batch_size):
        batch = collator([samples[i] for i in mine[start:start + batch_size]]).to(device)
        with amp():
            s = objective.sums(model, model(batch), batch)
        total = s if total is None else total + s
    if total is None:  # a rank with no samples still joins the all-reduce, with zeros
        counts = objective.counts(collator([samples[0]])).to(device)
        total = Sums({k: 0 * v for k, v in counts.items()})
    if d.world > 1:
        total = total.all_reduced()
    model.train(was_training)
    return objective.metrics(total)


# ----------------------------------------------------------------------------------------------
# Evaluation only


def evaluate_only(cfg: TrainConfig) -> dict:
    with started(cfg) as (d, device, dtype):
        tokenizer, model_cfg = checkpoint.model_spec(cfg.model)  # data is validated before the GPU
        samples = load_data(cfg.eval_path(), tokenizer, model_cfg, cfg, d, "eval")
        model = load_base(cfg.model, cfg.adapter, device, dtype) if cfg.adapter else \
            checkpoint.load(cfg.model, device, dtype, cfg.seed)
        if cfg.adapter:
            load_adapter(model, cfg.adapter)
        if cfg.speed.fp8:  # evaluated as --fp8 trains
            use_fp8(model, cfg.speed.fp8_scaling)
        t0 = time.time()
        metrics = evaluate(model, samples, Collator(model.cfg, cfg.speed.pad_multiple),
                           cfg.optim.batch_size, device, d, partial(autocast, device, dtype))
        metrics.update(num_samples=len(samples), seconds=round(time.time() - t0, 3))
        if d.main:
            os.makedirs(cfg.run.output_dir, exist_ok=True)
            with open(os.path.join(cfg.run.output_dir, "eval.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            print(json.dumps(metrics))
        return metrics


def main(argv=None) -> int:
    cfg = parse(TrainConfig, argv, __doc__)
    try:
        evaluate_only(cfg) if cfg.eval_only else train(cfg)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
