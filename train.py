"""LoRA fine-tuning and evaluation of Higgs-Audio v2 with raw torch.distributed (DDP).

    python train.py                                  # the demo: tiny model, bundled data
    python train.py --model CKPT --train_data train.jsonl --eval_data eval.jsonl --output_dir OUT
    torchrun --nproc_per_node 8 train.py ...        # or: bash launch.sh ...
    python train.py --model CKPT --eval_data FILE --eval_only --output_dir OUT

Every field of TrainConfig is a flag of the same name (`python train.py --help` lists them with
their units and defaults). run_dir.py says what a run writes to its output folder.
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

import torch
import torch.distributed as dist

import checkpoint
from chatml import DataError
from cli import flat, leaves, option, parse
from collate import Collator, expanded_length
from data import load_dataset
from device import Dist, autocast, init_distributed, local_rank, resolve_device
from formats import invalid_summary
from generate import ListenConfig, Listener
from lora import DEFAULT_TARGETS, count_parameters, inject_lora, load_adapter, save_adapter
from loss import LossSums, Objective, parse_codebook_weights
from run_dir import (RunDir, check_loggers, compare_settings, plot_metrics,
                     restore_training_state, resume_checkpoint, save_training_state, write_skipped)

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
                              "records are invalid", min=16, on_resume="fixed")
    skip_invalid: bool = option(False, "drop invalid records (listed in OUT/skipped_records.jsonl) "
                                "instead of stopping", on_resume="fixed")
    group_by_length: bool = option(True, "batch samples of similar expanded length (less padding)",
                                   on_resume="fixed")
    num_workers: int = option(-1, "background collation processes; -1: 2 on GPU, 0 on CPU", min=-1)


@dataclass
class LoRAConfig:
    """LoRA adapter"""
    lora_r: int = option(16, "rank of each adapter", min=1, on_resume="fixed")
    lora_alpha: float = option(32.0, "scale: the side path is multiplied by lora_alpha / lora_r",
                               above=0, on_resume="fixed")
    lora_dropout: float = option(0.0, "dropout on the adapters' input; 0 lets q/k/v and gate/up "
                                 "share one down-projection GEMM (faster)", min=0, max=0.9,
                                 on_resume="fixed")
    lora_targets: str = option(DEFAULT_TARGETS, "linears to adapt: groups attn, mlp (text FFN), "
                               "audio_mlp (DualFFN audio FFN), or regexes on module names",
                               on_resume="fixed")
    trainable_modules: str = option("", "modules trained in full, comma-separated regexes, e.g. "
                                    "audio_decoder_proj.audio_lm_head", on_resume="fixed")


@dataclass
class OptimConfig:
    """optimisation: AdamW (fp32 state), linear warm-up, then cosine decay"""
    max_steps: int = option(100, "optimizer steps to train", min=1, on_resume="applied")
    batch_size: int = option(4, "samples per GPU per micro-batch", min=1, on_resume="fixed")
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1, on_resume="fixed")
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
class LossConfig:
    """loss: text CE + per-codebook audio CE (+ optional voice consistency)"""
    text_loss_weight: float = option(1.0, "weight of the text cross-entropy", min=0, on_resume="applied")
    audio_loss_weight: float = option(1.0, "weight of the audio cross-entropy", min=0, on_resume="applied")
    codebook_weights: str = option("", "per-codebook weights of the audio term, e.g. 4,1,1,1,1,1,1,1 "
                                   "(scaled so equal weights give the plain mean); none: equal",
                                   on_resume="applied")
    voice_consistency_weight: float = option(0.0, "weight of 1 - cos(mean hidden state of the "
                                             "reference audio, of the target audio); 0: off",
                                             min=0, on_resume="applied")


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


@dataclass
class RunConfig:
    """output folder, checkpoints and logging"""
    output_dir: str = option("runs/demo", "output folder (run_dir.py lists what it holds)")
    resume: str = option("", "continue from the newest complete checkpoint in OUT/checkpoints "
                         "(--resume alone) or from a checkpoint folder", const="latest")
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
                       on_resume="fixed")
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
        """Flags that only make sense together (bounds are checked when parsing)."""
        if self.run.eval_every and not self.eval_path():
            raise DataError(f"--eval_every {self.run.eval_every} needs --eval_data FILE")
        if self.listen.sample_data and not self.listen.sample_every:
            raise DataError("--sample_data is read by --sample_every N; add it")
        if self.listen.sample_every and not (self.listen.sample_data or self.eval_path()):
            raise DataError("--sample_every needs prompts: --sample_data FILE, or --eval_data FILE "
                            "(its first --sample_count records)")
        if self.adapter and not self.eval_only:
            raise DataError("--adapter is read by --eval_only (training starts a new adapter; "
                            "continue a run with --resume)")
        if self.eval_only and not self.eval_path():
            raise DataError("--eval_only needs --eval_data FILE")
        if self.run.resume and self.run.overwrite:
            raise DataError("--resume continues the run in --output_dir and --overwrite deletes "
                            "it; give one of them")
        check_loggers(self.run.loggers())


# ----------------------------------------------------------------------------------------------
# Data


def load_samples(path: str, tokenizer, model_cfg, cfg: TrainConfig, training: bool = True,
                 main: bool = True) -> list:
    """Samples of a data file or folder, validated as `python data.py check` does: an invalid
    record stops the run with every reason listed, or with --skip_invalid is dropped and listed
    in OUT/skipped_records.jsonl. Training data must have trained assistant audio."""
    samples, invalid = load_dataset(path, tokenizer, model_cfg, cfg.data.max_seq_len,
                                    require_audio=training)
    if invalid and not cfg.data.skip_invalid:
        raise DataError(invalid_summary(path, invalid, len(samples) + len(invalid)) +
                        "\nfix them (`python data.py check` reports them all), or pass "
                        "--skip_invalid to train without them")
    if invalid and main:  # rank 0 writes the list
        write_skipped(cfg.run.output_dir, path, invalid)
    if not samples:
        raise DataError(f"{path}: no valid records")
    return samples


def step_indices(n: int, global_batch: int, seed: int, epoch: int,
                 lengths: list[int] | None = None) -> list[list[int]]:
    """The sample indices of each global step of an epoch (the incomplete tail is dropped).
    With `lengths`, samples are sorted by expanded length within windows of GROUP_WINDOW steps
    and the steps are then shuffled: batches of similar length waste little padding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        window = global_batch * GROUP_WINDOW
        perm = [i for w in range(0, n, window)
                for i in sorted(perm[w:w + window], key=lengths.__getitem__)]
    steps = [perm[i:i + global_batch] for i in range(0, n - global_batch + 1, global_batch)]
    if lengths is not None:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
    return steps


def micro_batches(step: list[int], d: Dist, batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of a global step: rank-contiguous slices, batch_size each."""
    mine = step[d.rank * len(step) // d.world:(d.rank + 1) * len(step) // d.world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def step_batches(samples, collator, cfg: TrainConfig, d: Dist, epoch: int, start: int, pin: bool):
    """(epoch, steps done in that epoch, this rank's collated micro-batches) for every step from
    step `start` of `epoch` on, epoch after epoch; background processes collate ahead."""
    from torch.utils.data import DataLoader

    global_batch = cfg.global_batch(d.world)
    lengths = [expanded_length(s, collator.cfg) for s in samples] if cfg.data.group_by_length else None
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else (2 if pin else 0)
    while True:
        jobs = [[[samples[i] for i in mb] for mb in micro_batches(s, d, cfg.optim.batch_size)]
                for s in step_indices(len(samples), global_batch, cfg.seed, epoch, lengths)[start:]]
        loader = DataLoader(jobs, batch_size=None, num_workers=workers, pin_memory=pin,
                            collate_fn=partial(collate_all, collator),
                            prefetch_factor=4 if workers else None,
                            # its own generator: creating the iterator must not draw from the
                            # global RNG (dropout), or a resumed run would diverge
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for i, batches in enumerate(loader, start + 1):
            yield epoch, i, batches
        epoch, start = epoch + 1, 0


def collate_all(collator, job: list) -> list:
    return [collator(mb) for mb in job]


# ----------------------------------------------------------------------------------------------
# Model, optimizer and one step


class TrainingForward(torch.nn.Module):
    """Model + objective in one forward, so DDP sees every trainable parameter (heads included)
    in the graph of its output."""

    def __init__(self, model, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch) -> LossSums:
        return self.objective.sums(self.model, self.model(batch), batch)


def data_parallel(model, objective: Objective, device, world: int) -> torch.nn.Module:
    """Model + objective, under DDP when there are several ranks (bench.py times this module)."""
    module = TrainingForward(model, objective)
    if world == 1:
        return module
    # every adapter takes part in every forward (model.DecoderLayer runs the audio FFN on no rows
    # when a micro-batch has no audio), so DDP skips its per-step search for unused parameters;
    # a trained Whisper tower only runs on batches with user audio, and needs the search. The
    # buffers (RoPE frequencies) never change: no broadcast of them before each forward. 100 MB
    # buckets: 7 all-reduces for the 631 MB of r=64 gradients. (static_graph=True was faster
    # still, but its gradients part from one process's: test_train's gloo run fails with it.)
    tower = any(p.requires_grad for n, p in model.named_parameters()
                if n.startswith(("audio_tower.", "audio_encoder_proj.")))
    # Dynamo would split each compiled layer at DDP's bucket edges, and that split fails on a
    # layer compiled for dynamic shapes once a layer's gradients pass the 1 MB first bucket (the
    # released shape). Layers are compiled one by one, so each layer's gradients reach DDP as its
    # backward ends and the all-reduce overlaps the layers below without the split.
    torch._dynamo.config.optimize_ddp = False
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=tower, broadcast_buffers=False,
        bucket_cap_mb=100, gradient_as_bucket_view=True)


def add_lora(model, cfg: TrainConfig) -> list:
    """Inject the adapters (the same init on every rank), compile if asked; trainable params."""
    torch.manual_seed(cfg.seed)
    c = cfg.lora
    inject_lora(model, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets, c.trainable_modules)
    model.activation_checkpointing = cfg.speed.activation_checkpointing
    if cfg.speed.compile:
        model.compile_layers(cfg.speed.compile_memory_budget, cpp_wrapper=cfg.speed.compile_cpp_wrapper)
    return [p for p in model.parameters() if p.requires_grad]


def lr_factor(step: int, c: OptimConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def settings(cfg: TrainConfig, d: Dist) -> dict:
    """config.json: every flag, and the world size (part of the batch layout)."""
    return dict(flat(cfg), world_size=d.world)


def make_optimizer(params: list, cfg: TrainConfig, device):
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  fused=device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, c=cfg.optim))


def apply_optim_settings(optimizer, scheduler, c: OptimConfig) -> None:
    """After a resume: this run's learning rate and weight decay, not the checkpoint's (the
    schedule's other settings are read by lr_factor anyway)."""
    scheduler.base_lrs = [c.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group.update(weight_decay=c.weight_decay, initial_lr=c.lr,
                     lr=c.lr * lr_factor(scheduler.last_epoch, c))


def forward_backward(module, objective: Objective, cpu_batches: list, d: Dist, device,
                     amp) -> LossSums:
    """Forward and backward over this rank's micro-batches, each micro-batch's loss divided by the
    step's global token counts, so the gradient does not depend on how the step is split.
    Returns this rank's loss sums (the backward may still be running on the GPU)."""
    counts = sum((objective.counts(b) for b in cpu_batches[1:]), objective.counts(cpu_batches[0]))
    counts = counts.to(device)
    if d.world > 1:
        counts = counts.all_reduced()
    sums = None
    for i, batch in enumerate(b.to(device) for b in cpu_batches):
        last = i == len(cpu_batches) - 1
        with (nullcontext() if last or d.world == 1 else module.no_sync()), amp():
            s = module(batch)
            # DDP averages gradients over ranks; the objective is their sum
            (objective.loss(s, counts) * d.world).backward()
        sums = s.detach() if sums is None else sums + s.detach()
    return sums


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


@torch.no_grad()
def evaluate(model, samples: list, collator: Collator, batch_size: int, device, d: Dist = Dist(),
             amp=nullcontext) -> dict:
    """Token-weighted losses over all samples, sharded over ranks and all-reduced: the same for
    any batch size or world size."""
    was_training = model.training
    model.eval()
    objective = Objective(model.cfg)
    total = LossSums.zeros(model.cfg.audio_num_codebooks, device)
    mine = samples[d.rank::d.world]
    for start in range(0, len(mine), batch_size):
        batch = collator(mine[start:start + batch_size]).to(device)
        with amp():
            total = total + objective.sums(model, model(batch), batch)
    if d.world > 1:
        total = total.all_reduced()
    model.train(was_training)
    return objective.metrics(total)


# ----------------------------------------------------------------------------------------------
# Training


@contextmanager
def started(cfg: TrainConfig):
    """Flags checked, then (Dist, device, dtype); the process group is closed however it ends."""
    cfg.check()
    device, dtype = resolve_device(cfg.speed.device, cfg.speed.dtype, local_rank())
    d = init_distributed(device)
    try:
        yield d, device, dtype
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict:
    with started(cfg) as (d, device, dtype):
        run = RunDir(cfg.run.output_dir, d.main)
        try:
            run.claim(resume=bool(cfg.run.resume), overwrite=cfg.run.overwrite)
            return Trainer(cfg, d, device, dtype, run).fit()
        finally:
            run.release()


class Trainer:
    """One training run, set up in named steps; `fit` is the loop."""

    def __init__(self, cfg: TrainConfig, d: Dist, device, dtype, run: RunDir):
        self.cfg, self.d, self.device, self.run = cfg, d, device, run
        self.log = (lambda msg: print(msg, flush=True)) if d.main else (lambda msg: None)
        self.amp = partial(autocast, device, dtype)
        self.peak_tflops = cfg.speed.peak_tflops or (H100_BF16_TFLOPS if device.type == "cuda"
                                                     else 0.0)
        self.load_data()
        self.model = checkpoint.load(cfg.model, device, dtype, cfg.seed)
        self.params = add_lora(self.model, cfg)
        trainable, total = count_parameters(self.model)
        self.log(f"model: {total:,} parameters, {trainable:,} trainable "
                 f"({100 * trainable / total:.2f}%)")
        self.model.train()
        torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # distinct dropout masks per rank
        self.module = data_parallel(self.model, self.objective, device, d.world)
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg, device)
        self.position = dict(step=0, epoch=0, step_in_epoch=0)
        if self.resume_from:
            self.position = restore_training_state(self.resume_from, self.model, self.optimizer,
                                                   self.scheduler, d.rank)
            apply_optim_settings(self.optimizer, self.scheduler, cfg.optim)
            self.log(f"resumed from {self.resume_from} at step {self.position['step']}")
        if d.main:
            run.write_config(self.settings)
        if self.resume_from:
            run.cut_back(self.position["step"], self.log)
        run.open_metrics(self.position["step"], cfg.run.loggers(), self.settings)

    def load_data(self) -> None:
        """Settings, data and prompts, all checked before any weights are read."""
        cfg, d = self.cfg, self.d
        tokenizer, model_cfg = checkpoint.model_spec(cfg.model)
        c = cfg.loss
        self.objective = Objective(model_cfg, c.text_loss_weight, c.audio_loss_weight,
                                   parse_codebook_weights(c.codebook_weights,
                                                          model_cfg.audio_num_codebooks),
                                   c.voice_consistency_weight)
        self.settings = settings(cfg, d)
        # rank 0 decides, so every rank resumes from the same step (--output_dir is shared)
        found = [resume_checkpoint(cfg.run.resume, cfg.run.output_dir) if d.main else None]
        if d.world > 1:
            dist.broadcast_object_list(found)
        self.resume_from = found[0]
        if self.resume_from:
            kinds = {f.name: f.metadata.get("on_resume") for _, f, _ in leaves(TrainConfig)}
            compare_settings(self.resume_from, self.settings, dict(kinds, world_size="fixed"),
                             self.log)
        elif cfg.run.resume:
            self.log("--resume: no complete checkpoint found, starting fresh")
        self.train_samples = load_samples(cfg.data.train_data, tokenizer, model_cfg, cfg,
                                          main=d.main)
        eval_path = cfg.eval_path()
        self.eval_samples = load_samples(eval_path, tokenizer, model_cfg, cfg, training=False,
                                         main=d.main) \
            if eval_path else []
        global_batch = cfg.global_batch(d.world)
        if len(self.train_samples) < global_batch:
            raise DataError(f"{cfg.data.train_data}: {len(self.train_samples)} records, fewer than "
                            f"one global batch (--batch_size {cfg.optim.batch_size} x --grad_accum "
                            f"{cfg.optim.grad_accum} x {d.world} GPUs)")
        # every rank reads the prompts (bad data stops them all); rank 0 alone listens
        self.listener = Listener.for_training(cfg.listen, cfg.listen.sample_data or eval_path,
                                              tokenizer, model_cfg, cfg.seed, self.device, d.main) \
            if cfg.listen.sample_every else None
        self.collator = Collator(model_cfg)

    def fit(self) -> dict:
        cfg, pos = self.cfg, self.position
        batches = step_batches(self.train_samples, self.collator, cfg, self.d, pos["epoch"],
                               pos["step_in_epoch"], pin=self.device.type == "cuda")
        step, self.bad_steps, started, row = pos["step"], 0, time.time(), {}
        while step < cfg.optim.max_steps:
            epoch, in_epoch, cpu_batches = next(batches)
            row = dict(step=step + 1, epoch=epoch, **self.step(cpu_batches), time=time.time())
            step += 1
            self.run.log(row)
            if step % cfg.run.log_every == 0 or step == cfg.optim.max_steps:
                eta = (time.time() - started) / (step - pos["step"]) * (cfg.optim.max_steps - step)
                self.log(progress_line(row, cfg.optim.max_steps, eta))
            self.side_work(step, dict(step=step, epoch=epoch, step_in_epoch=in_epoch))
        if self.eval_samples:
            row.update({f"eval_{k}": v for k, v in self.evaluate(step, "final eval").items()})
        if self.d.main:
            save_adapter(self.model, os.path.join(self.run.path, "adapter"), base_model=cfg.model)
            plot_metrics(self.run.path)
            self.log(f"adapter written to {os.path.join(self.run.path, 'adapter')}")
        return row

    def step(self, cpu_batches: list) -> dict:
        """One optimizer step; a non-finite loss or gradient skips the update on every rank."""
        t0, cfg = time.time(), self.cfg
        sums = forward_backward(self.module, self.objective, cpu_batches, self.d, self.device,
                                self.amp)
        flops = sum(step_flops(self.model, b) for b in cpu_batches)  # while the GPU runs
        positions = sum(float(b.attention_mask.sum()) for b in cpu_batches) * self.d.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
        metrics = self.objective.metrics(sums.all_reduced() if self.d.world > 1 else sums)
        # the grad norm is of all-reduced gradients: every rank takes the same branch
        if math.isfinite(metrics["loss"]) and bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.log(f"step {self.scheduler.last_epoch + 1}: non-finite loss or gradient (loss "
                     f"{metrics['loss']}, grad norm {float(grad_norm)}); step skipped "
                     f"({self.bad_steps}/{cfg.optim.max_bad_steps}). Lower --lr or check the data.")
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]  # the one this step used
        self.scheduler.step()
        if self.bad_steps >= cfg.optim.max_bad_steps:
            raise SystemExit(f"stopping: {self.bad_steps} consecutive non-finite steps")
        return dict(metrics, lr=lr, grad_norm=float(grad_norm),
                    **speed(time.time() - t0, positions, metrics, flops, self.peak_tflops,
                            self.device))

    def side_work(self, step: int, position: dict) -> None:
        """Evaluation, listening and checkpoints, each when due."""
        cfg, last = self.cfg, step == self.cfg.optim.max_steps
        if self.eval_samples and cfg.run.eval_every and step % cfg.run.eval_every == 0 and not last:
            self.evaluate(step)
        if self.listener and (step % self.listener.every == 0 or last):
            if self.d.main:
                for row in self.listener(self.model, step, self.run.path):
                    self.run.log(row)
            if self.d.world > 1:  # the other ranks wait for rank 0's samples
                dist.barrier()
        if step % cfg.run.save_every == 0 or last:
            t0 = time.time()
            folder = save_training_state(self.run, self.d, position, self.model, self.optimizer,
                                         self.scheduler, self.settings)
            if folder:
                size = sum(os.path.getsize(os.path.join(root, f))
                           for root, _, files in os.walk(folder) for f in files)
                self.run.log(dict(step=step, checkpoint_seconds=time.time() - t0,
                                  checkpoint_mib=size / 2 ** 20))
                self.run.keep_last(cfg.run.keep_checkpoints)

    def evaluate(self, step: int, what: str = "eval") -> dict:
        ev = evaluate(self.model, self.eval_samples, self.collator, self.cfg.optim.batch_size,
                      self.device, self.d, self.amp)
        self.run.log(dict(step=step, **{f"eval_{k}": v for k, v in ev.items()}))
        self.log(f"{what} step {step}: text {ev['text_loss']:.4f} audio {ev['audio_loss']:.4f}")
        return ev


def speed(seconds: float, positions: float, metrics: dict, flops: float, peak_tflops: float,
          device) -> dict:
    """Throughput figures of a step (positions: rank 0's times the number of ranks; flops and
    peak: one rank's, as MFU is the same on every rank)."""
    frames = metrics["num_audio_tokens_per_codebook"][0]
    return dict(step_seconds=seconds, positions_per_s=positions / seconds,
                audio_seconds_per_s=frames / 25 / seconds,
                mfu=flops / seconds / (peak_tflops * 1e12) if peak_tflops else None,
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                if device.type == "cuda" else None)


def progress_line(m: dict, max_steps: int, eta: float) -> str:
    per_cb = " ".join(f"{x:.2f}" for x in m["audio_loss_per_codebook"])
    extra = "".join(f" {name} {fmt(m[key])}" for name, key, fmt in (
        ("voice", "voice_consistency", "{:.4f}".format), ("mfu", "mfu", "{:.1%}".format),
        ("mem", "peak_memory_gib", "{:.1f}GiB".format)) if m.get(key) is not None)
    return (f"step {m['step']}/{max_steps} loss {m['loss']:.4f} text {m['text_loss']:.4f} audio "
            f"{m['audio_loss']:.4f} [{per_cb}] lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
            f"{m['positions_per_s']:.0f} pos/s {m['audio_seconds_per_s']:.1f} audio-s/s{extra} "
            f"eta {eta:.0f}s")


# ----------------------------------------------------------------------------------------------
# Evaluation only


def evaluate_only(cfg: TrainConfig) -> dict:
    with started(cfg) as (d, device, dtype):
        tokenizer, model_cfg = checkpoint.model_spec(cfg.model)  # data is validated before the GPU
        samples = load_samples(cfg.eval_path(), tokenizer, model_cfg, cfg, training=False,
                               main=d.main)
        model = checkpoint.load(cfg.model, device, dtype, cfg.seed)
        if cfg.adapter:
            load_adapter(model, cfg.adapter)
        t0 = time.time()
        metrics = evaluate(model, samples, Collator(model.cfg), cfg.optim.batch_size, device, d,
                           partial(autocast, device, dtype))
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
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
