"""LoRA fine-tuning and evaluation of Higgs-Audio v2 with raw torch.distributed (DDP).

    python train.py                                  # the demo: tiny model, bundled data
    python train.py --model CKPT --train_data train.jsonl --eval_data eval.jsonl --output_dir OUT
    torchrun --nproc_per_node 8 train.py ...        # or: bash launch.sh ...
    python train.py --model CKPT --eval_data FILE --eval_only --output_dir OUT

Every TrainConfig field below is a command-line flag of the same name. A run writes
OUT/config.json, OUT/metrics.jsonl (one JSON object per line), OUT/checkpoints/step_N/ (adapter,
optimizer, scheduler, data position, RNG states; complete or absent) and OUT/adapter/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from collate import Collator
from data import DataError, expanded_length, invalid_summary, load_dataset, model_spec
from generate import Sampler, Sampling, describe, load_prompts
from lora import count_parameters, inject_lora, save_adapter, DEFAULT_TARGETS
from loss import (LossSums, loss_sums, normalised_codebook_weights, total_loss,
                  voice_consistency_sums, voice_position_counts)
from model import HiggsConfig, build_model, load_model

GROUP_WINDOW = 64  # steps per window of length-sorted samples (--group_by_length)
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


@dataclass
class TrainConfig:
    model: str = "tiny"  # checkpoint folder, or 'tiny' (random tiny model + demo tokenizer)
    train_data: str = os.path.join(DEMO_DIR, "data", "train.jsonl")
    eval_data: str = ""  # default for the demo: demo/data/eval.jsonl; "" = no evaluation
    output_dir: str = "runs/demo"
    eval_only: bool = False
    skip_invalid: bool = False  # drop invalid records (listed in OUT/skipped_records.jsonl)
    max_seq_len: int = 4096  # positions after audio expansion; longer records are invalid
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU | bfloat16 | float32
    # optimisation
    max_steps: int = 100
    batch_size: int = 4  # samples per device per micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each layer: 2.3-4.2x transformers+PEFT speed (README)
    compile_memory_budget: float = 1.0  # <1 recomputes more in backward to hold fewer activations
    compile_cpp_wrapper: bool = False  # launch compiled kernels from C++: small batches, slow host
    group_by_length: bool = True  # batch samples of similar expanded length (less padding)
    num_workers: int = -1  # background collation processes; -1 = 2 on GPU, 0 on CPU
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = DEFAULT_TARGETS  # groups attn,mlp,audio_mlp or regexes on module names
    trainable_modules: str = ""  # e.g. audio_decoder_proj.audio_lm_head (fully trained)
    # loss
    text_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    codebook_weights: str = ""  # e.g. 4,1,1,1,1,1,1,1; normalised so all-ones = plain mean
    voice_consistency_weight: float = 0.0
    # schedule of side work
    log_every: int = 5
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 20
    keep_checkpoints: int = 3
    resume: str = ""  # 'latest' or a checkpoint path; bare --resume means latest
    max_bad_steps: int = 3  # consecutive non-finite steps before stopping
    peak_tflops: float = 0.0  # per device, for MFU; 0 = 989 (H100 bf16 dense) on GPU, off on CPU
    # listening to checkpoints: generated samples and their health checks (README, generate.py)
    sample_every: int = 0  # generate every N steps and at the end; 0 = never
    sample_data: str = ""  # prompts (any data format); "" = the eval data
    sample_count: int = 4  # its first N records
    sample_max_seconds: float = 20.0  # frame limit of a generation
    sample_temperature: float = Sampling.temperature  # 0 = greedy
    sample_top_k: int = Sampling.top_k
    sample_top_p: float = Sampling.top_p
    audio_tokenizer: str = ""  # HiggsAudioV2TokenizerModel folder: WAVs (silence check on them)
    asr_model: str = ""  # transformers speech recognition model folder: word error rate
    speaker_model: str = ""  # transformers x-vector model folder: speaker similarity

    def resolved_eval_data(self) -> str:
        if self.eval_data:
            return self.eval_data
        demo_train = os.path.join(DEMO_DIR, "data", "train.jsonl")
        return os.path.join(DEMO_DIR, "data", "eval.jsonl") if self.train_data == demo_train else ""


def config_from_args(argv=None) -> TrainConfig:
    """Every TrainConfig field becomes a --flag of the same name and type."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.type == "bool":  # --flag / --no-flag
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "resume":
            p.add_argument("--resume", nargs="?", const="latest", default="")
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(f.type, str),
                           default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# Setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device_kind == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return d


def resolve_device(cfg: TrainConfig, d: Dist) -> tuple[torch.device, torch.dtype]:
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    device = torch.device(kind, d.local_rank) if kind == "cuda" else torch.device("cpu")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    return device, dtype


def build(cfg: TrainConfig, model_cfg: HiggsConfig, device, dtype):
    """The model: a checkpoint folder, or the tiny random model (`--model tiny`)."""
    if cfg.model == "tiny":
        return build_model(model_cfg, device=device, dtype=dtype, seed=cfg.seed)
    return load_model(cfg.model, device=device, dtype=dtype)


def load_samples(path: str, tokenizer, model_cfg, cfg: TrainConfig | None = None,
                 training: bool = True) -> list:
    """Samples of a data file or folder in any supported format, validated as `python data.py
    check` does: an invalid record stops the run with every reason listed, or with --skip_invalid
    is dropped and listed (index, source, reason) in OUT/skipped_records.jsonl. Training data
    must have trained assistant audio; evaluation data may be text-only."""
    cfg = cfg or TrainConfig()
    samples, invalid = load_dataset(path, tokenizer, model_cfg, cfg.max_seq_len,
                                    require_audio=training)
    if invalid and not cfg.skip_invalid:
        raise DataError(invalid_summary(path, invalid, len(samples) + len(invalid)) +
                        "\nfix them (`python data.py check` reports them all), or pass "
                        "--skip_invalid to train without them")
    if invalid and int(os.environ.get("RANK", "0")) == 0:
        out = os.path.join(cfg.output_dir, "skipped_records.jsonl")
        os.makedirs(cfg.output_dir, exist_ok=True)
        kept = []  # lines of the other data file (train vs eval) stay
        if os.path.isfile(out):
            with open(out, encoding="utf-8") as f:
                kept = [line for line in f if json.loads(line)["data"] != path]
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(kept + [json.dumps({"data": path, "index": x.index, "source": x.source,
                                             "reason": x.reason}) + "\n" for x in invalid])
        print(f"{path}: skipped {len(invalid)} invalid records, listed in {out}", flush=True)
    if not samples:
        raise DataError(f"{path}: no valid records")
    return samples


def log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, samples: list, collator: Collator, batch_size: int, device, d: Dist = Dist(),
             autocast=nullcontext) -> LossSums:
    """Token-weighted sums over all samples, sharded over ranks and all-reduced: the same for any
    batch size or world size."""
    was_training = model.training
    model.eval()
    K = model.cfg.audio_num_codebooks
    total = LossSums(*(torch.zeros(n, device=device) for n in ((), (), K, K)))
    mine = samples[d.rank::d.world]
    for start in range(0, len(mine), batch_size):
        batch = collator(mine[start:start + batch_size]).to(device)
        with autocast():
            total = total + loss_sums(model, model(batch), batch).detach()
    if d.world > 1:
        vec = total.as_vector()
        dist.all_reduce(vec)
        total = LossSums.from_vector(vec)
    model.train(was_training)
    return total


def run_eval(cfg: TrainConfig) -> dict:
    d = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    device, dtype = resolve_device(cfg, d)
    eval_path = cfg.resolved_eval_data()
    if not eval_path:
        raise DataError("--eval_only needs --eval_data FILE")
    tokenizer, model_cfg = model_spec(cfg.model)  # data is validated before the GPU is touched
    samples = load_samples(eval_path, tokenizer, model_cfg, cfg, training=False)
    model = build(cfg, model_cfg, device, dtype)
    t0 = time.time()
    metrics = evaluate(model, samples, Collator(model.cfg), cfg.batch_size, device, d).metrics()
    metrics.update(num_samples=len(samples), seconds=round(time.time() - t0, 3))
    if d.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "eval.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, cut into global steps, sharded over ranks


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


def prefetched_steps(samples, lengths, collator, cfg, d: Dist, global_batch: int, epoch: int,
                     start: int, workers: int, pin: bool):
    """This rank's collated micro-batches for each step of an epoch from step `start` on,
    collated by `workers` background processes (0 = inline) so the GPU never waits."""
    from torch.utils.data import DataLoader

    jobs = [[[samples[i] for i in mb] for mb in micro_batches(s, d, cfg.batch_size)]
            for s in step_indices(len(samples), global_batch, cfg.seed, epoch, lengths)[start:]]
    loader = DataLoader(jobs, batch_size=None, num_workers=workers, pin_memory=pin,
                        collate_fn=lambda job: [collator(mb) for mb in job],
                        prefetch_factor=4 if workers else None,
                        # its own generator: creating the iterator must not draw from the global
                        # RNG (dropout), or a resumed run would diverge from an uninterrupted one
                        generator=torch.Generator().manual_seed(cfg.seed + epoch))
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (whole or absent)


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    return [os.path.join(root, n) for n in names]


def save_training_checkpoint(cfg, d: Dist, model, optimizer, scheduler, state: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes to .tmp then renames into place."""
    rngs = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if d.main:
        root = os.path.join(cfg.output_dir, "checkpoints")
        final = os.path.join(root, f"step_{state['step']:08d}")
        tmp = os.path.join(root, f".tmp_step_{state['step']:08d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_adapter(model, os.path.join(tmp, "adapter"), base_model=cfg.model)
        torch.save(dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        rng=rngs, state=state), os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in checkpoint_dirs(cfg.output_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    if d.world > 1:
        dist.barrier()


def resume_path(cfg: TrainConfig) -> str | None:
    if not cfg.resume:
        return None
    if cfg.resume != "latest":
        if not os.path.isfile(os.path.join(cfg.resume, "trainer.pt")):
            raise SystemExit(f"--resume {cfg.resume}: not a complete checkpoint (no trainer.pt)")
        return cfg.resume
    found = checkpoint_dirs(cfg.output_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# Throughput accounting


def step_flops(model, batch) -> float:
    """Training FLOPs of one micro-batch, LoRA style (SPEC section 10): 4 x frozen matmul params
    active per position (attention + one FFN; heads only where computed; no frozen weight
    gradients) + 6 x active LoRA params + causal attention scores."""
    c = model.cfg
    D, hd = c.hidden_size, c.head_dim
    attn = D * hd * (2 * c.num_heads + 2 * c.num_kv_heads)
    ffn = 3 * D * c.intermediate_size
    positions = float(batch.attention_mask.sum())
    frozen = c.num_layers * (attn + ffn) * positions
    frozen += D * c.vocab_size * batch.text_logit_index.numel()
    frozen += D * c.audio_num_codebooks * c.codebook_rows * batch.audio_logit_rows.numel()
    lora = 0.0
    n_audio = float(batch.audio_index.numel())
    for name, p in model.named_parameters():
        if p.requires_grad:
            share = n_audio if ".audio_mlp." in name else \
                positions - n_audio if ".mlp." in name else positions
            lora += p.numel() * share
    lengths = batch.attention_mask.sum(1).float()
    scores = 12 * c.num_layers * c.num_heads * hd * float((lengths ** 2).sum()) / 2
    return 4 * frozen + 6 * lora + scores


# ----------------------------------------------------------------------------------------------
# Training


class TrainingForward(torch.nn.Module):
    """Model + loss in one forward, so DDP sees every trainable parameter (heads included) in
    the graph of its output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, with_voice_consistency: bool):
        hidden = self.model(batch)
        sums = loss_sums(self.model, hidden, batch)
        vs = voice_consistency_sums(hidden, batch)[0] if with_voice_consistency else None
        return sums, vs


def data_parallel(model, device, world: int) -> torch.nn.Module:
    """Model + loss, under DDP when there are several ranks (bench.py times this same module)."""
    step_module = TrainingForward(model)
    if world == 1:
        return step_module
    # find_unused_parameters: a micro-batch without audio leaves the audio-FFN LoRA unused
    return torch.nn.parallel.DistributedDataParallel(
        step_module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True)


def train(cfg: TrainConfig) -> dict:
    d = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    device, dtype = resolve_device(cfg, d)
    tokenizer, model_cfg = model_spec(cfg.model)  # data is validated before the GPU is touched
    train_samples = load_samples(cfg.train_data, tokenizer, model_cfg, cfg)
    eval_path = cfg.resolved_eval_data()
    eval_samples = load_samples(eval_path, tokenizer, model_cfg, cfg, training=False) if eval_path else []
    prompts = sample_prompts(cfg, eval_path, tokenizer, model_cfg)
    model = build(cfg, model_cfg, device, dtype)

    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    inject_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                cfg.trainable_modules)
    trainable, total = count_parameters(model)
    log(d, f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)")
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        model.compile_layers(cfg.compile_memory_budget, cpp_wrapper=cfg.compile_cpp_wrapper)
    model.train()
    torch.manual_seed(cfg.seed * 1000 + d.rank + 1)  # distinct dropout masks per rank
    ddp = data_parallel(model, device, d.world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")

    def lr_lambda(step):  # linear warmup, cosine decay to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    collator = Collator(model.cfg)
    K = model.cfg.audio_num_codebooks
    cb_weights = normalised_codebook_weights(
        [float(w) for w in cfg.codebook_weights.split(",")] if cfg.codebook_weights else None, K)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if device.type == "cuda" and dtype == torch.bfloat16 else nullcontext
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    if len(train_samples) < global_batch:
        raise DataError(f"{cfg.train_data}: {len(train_samples)} records, fewer than one global "
                        f"batch ({cfg.batch_size} x {cfg.grad_accum} x {d.world} GPUs)")

    step, epoch, step_in_epoch = 0, 0, 0
    path = resume_path(cfg)
    if path:
        from lora import read_adapter

        blob = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
        _, tensors = read_adapter(os.path.join(path, "adapter"))
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                named[n].copy_(t)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        step, epoch, step_in_epoch = (blob["state"][k] for k in ("step", "epoch", "step_in_epoch"))
        set_rng_state(blob["rng"][d.rank])
        log(d, f"resumed from {path} at step {step}")
    elif cfg.resume:
        log(d, "--resume: no checkpoint found, starting fresh")

    if d.main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if d.main else None
    peak = cfg.peak_tflops or (989.0 if device.type == "cuda" else 0.0)
    bad_steps, t_start, step_at_start = 0, time.time(), step
    last_metrics: dict = {}

    def write_metrics(m: dict) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()

    sampler = None
    if prompts and d.main:
        with rng_kept(device):
            sampler = Sampler(Sampling(temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                                       top_p=cfg.sample_top_p, seed=cfg.seed,
                                       max_seconds=cfg.sample_max_seconds),
                              device, cfg.audio_tokenizer, cfg.asr_model, cfg.speaker_model)

    workers = cfg.num_workers if cfg.num_workers >= 0 else (2 if device.type == "cuda" else 0)
    lengths = [expanded_length(s, model.cfg) for s in train_samples] if cfg.group_by_length else None
    stream = None
    while step < cfg.max_steps:
        if stream is None:
            stream = prefetched_steps(train_samples, lengths, collator, cfg, d, global_batch,
                                      epoch, step_in_epoch, workers, pin=device.type == "cuda")
        cpu_batches = next(stream, None)
        if cpu_batches is None:
            epoch, step_in_epoch, stream = epoch + 1, 0, None
            continue
        t0 = time.time()
        # global token counts first: every micro-batch's loss is divided by the step's total
        counts = LossSums.counts(cpu_batches[0], K, "cpu")
        for b in cpu_batches[1:]:
            counts = counts + LossSums.counts(b, K, "cpu")
        # samples with both reference and target audio: the voice-consistency term's count
        vc_count = sum(float((voice_position_counts(b) > 0).all(1).sum()) for b in cpu_batches)
        vec = torch.cat([counts.as_vector(), torch.tensor([vc_count])]).to(device)
        batches = [b.to(device) for b in cpu_batches]
        if d.world > 1:
            dist.all_reduce(vec)
        global_counts, global_vc = LossSums.from_vector(vec[:-1]), vec[-1]
        step_sums, vc_sum = None, torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or d.world == 1
            with (nullcontext() if sync else ddp.no_sync()), autocast():
                sums, vs = ddp(batch, bool(cfg.voice_consistency_weight))
                loss = total_loss(sums, global_counts, cfg.text_loss_weight, cfg.audio_loss_weight,
                                  cb_weights)
                if vs is not None:
                    loss = loss + cfg.voice_consistency_weight * vs / global_vc.clamp(min=1)
                    vc_sum = vc_sum + vs.detach()
                # DDP averages gradients over ranks; the objective is their sum
                (loss * d.world).backward()
            step_sums = sums.detach() if step_sums is None else step_sums + sums.detach()
        # counted from the host copies while the GPU runs the backward (reading the GPU batches
        # would make the host wait for it)
        flops = sum(step_flops(model, b) for b in cpu_batches)
        positions = sum(float(b.attention_mask.sum()) for b in cpu_batches) * d.world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        local = torch.cat([step_sums.as_vector(), vc_sum.view(1)])
        if d.world > 1:
            dist.all_reduce(local)
        stats = LossSums.from_vector(local[:-1]).metrics()
        finite = bool(torch.isfinite(grad_norm)) and all(map(math.isfinite, [stats["text_loss"],
                                                                            stats["audio_loss"]]))
        # grad_norm is computed from all-reduced gradients, so every rank takes the same branch
        if finite:
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            log(d, f"step {step + 1}: non-finite loss or gradient (loss text {stats['text_loss']}, "
                   f"audio {stats['audio_loss']}, grad norm {float(grad_norm)}); step skipped "
                   f"({bad_steps}/{cfg.max_bad_steps}). Lower --lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step, step_in_epoch = step + 1, step_in_epoch + 1
        if bad_steps >= cfg.max_bad_steps:
            raise SystemExit(f"stopping: {bad_steps} consecutive non-finite steps")

        dt = time.time() - t0
        audio_frames = stats["num_audio_tokens_per_codebook"][0] if K else 0
        last_metrics = dict(
            step=step, epoch=epoch, loss=stats["text_loss"] * cfg.text_loss_weight +
            stats["audio_loss"] * cfg.audio_loss_weight, **stats,
            voice_consistency=float(local[-1]) / max(1.0, float(global_vc)),
            lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), step_seconds=dt,
            positions_per_s=positions / dt, audio_seconds_per_s=audio_frames / 25 / dt,
            mfu=flops / dt / (peak * 1e12) if peak else None,
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None)
        write_metrics(last_metrics)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            eta = (time.time() - t_start) / (step - step_at_start) * (cfg.max_steps - step)
            per_cb = " ".join(f"{x:.2f}" for x in stats["audio_loss_per_codebook"])
            mfu = f" mfu {100 * last_metrics['mfu']:.1f}%" if peak else ""
            mem = f" mem {last_metrics['peak_memory_gib']:.1f}GiB" if device.type == "cuda" else ""
            log(d, f"step {step}/{cfg.max_steps} loss {last_metrics['loss']:.4f} text "
                   f"{stats['text_loss']:.4f} audio {stats['audio_loss']:.4f} [{per_cb}] lr "
                   f"{last_metrics['lr']:.2e} gnorm {float(grad_norm):.3f} "
                   f"{last_metrics['positions_per_s']:.0f} pos/s "
                   f"{last_metrics['audio_seconds_per_s']:.1f} audio-s/s{mfu}{mem} eta {eta:.0f}s")
        if eval_samples and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            ev = evaluate(model, eval_samples, collator, cfg.batch_size, device, d, autocast).metrics()
            write_metrics(dict(step=step, **{f"eval_{k}": v for k, v in ev.items()}))
            log(d, f"eval step {step}: text {ev['text_loss']:.4f} audio {ev['audio_loss']:.4f}")
        if prompts and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            if d.main:
                for row in listen(cfg, sampler, model, prompts, step, device):
                    write_metrics(row)
            if d.world > 1:  # the other ranks wait for rank 0's samples
                dist.barrier()
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_training_checkpoint(cfg, d, model, optimizer, scheduler,
                                     dict(step=step, epoch=epoch, step_in_epoch=step_in_epoch))

    result = dict(last_metrics)
    if eval_samples:
        ev = evaluate(model, eval_samples, collator, cfg.batch_size, device, d, autocast).metrics()
        write_metrics(dict(step=step, **{f"eval_{k}": v for k, v in ev.items()}))
        log(d, f"final eval: text {ev['text_loss']:.4f} audio {ev['audio_loss']:.4f}")
        result.update({f"eval_{k}": v for k, v in ev.items()})
    if d.main:
        save_adapter(model, os.path.join(cfg.output_dir, "adapter"), base_model=cfg.model)
        metrics_file.close()
        plot_metrics(cfg.output_dir)
        log(d, f"adapter written to {os.path.join(cfg.output_dir, 'adapter')}")
    if d.world > 1:
        dist.destroy_process_group()
    return result


def sample_prompts(cfg: TrainConfig, eval_path: str, tokenizer, model_cfg) -> list:
    """The held-out prompts of --sample_every (read on every rank, so bad data stops them all)."""
    if not cfg.sample_every:
        if cfg.sample_data:
            raise DataError("--sample_data is read by --sample_every N; add it")
        return []
    path = cfg.sample_data or eval_path
    if not path:
        raise DataError("--sample_every needs prompts: --sample_data FILE, or --eval_data FILE "
                        "(its first --sample_count records)")
    return load_prompts(path, cfg.sample_count, tokenizer, model_cfg)


def rng_kept(device):
    """Context in which random draws leave the CPU and `device` generators as they were."""
    return torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else [])


def listen(cfg: TrainConfig, sampler: Sampler, model, prompts: list, step: int, device) -> list:
    """Rank 0: the current adapter's samples in OUT/samples/step_N/, their health rows for
    metrics.jsonl, and a loud warning for each failed check. Leaves every RNG as it was, so a
    resumed run stays exact."""
    out_dir = os.path.join(cfg.output_dir, "samples", f"step_{step:08d}")
    names = [f"sample{i}" for i in range(len(prompts))]
    with rng_kept(device):
        results = sampler(model, prompts, out_dir, names)
    print(f"samples at step {step} in {out_dir}:", flush=True)
    for name, r in zip(names, results):
        print(f"  {name}: {describe(r)}", flush=True)
    failed = [f"{name} ({prompt.source}): {', '.join(r['failed'])}"
              for name, prompt, r in zip(names, prompts, results) if r["failed"]]
    if failed:
        print(f"WARNING: {len(failed)} of {len(names)} samples at step {step} FAILED health checks: "
              f"{'; '.join(failed)}. README 'Listening to checkpoints' says what usually causes "
              "each and what to do", flush=True)
    return [dict(step=step, sample=i, **{f"sample_{k}": v for k, v in r.items()})
            for i, r in enumerate(results)]


def plot_metrics(output_dir: str) -> None:
    """loss.png from metrics.jsonl when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(pip install matplotlib for a loss plot; metrics are in {output_dir}/metrics.jsonl)")
        return
    rows = [json.loads(l) for l in open(os.path.join(output_dir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "text_loss", "audio_loss"):
        ax.plot([r["step"] for r in train_rows], [r[key] for r in train_rows], label=key)
    evals = [r for r in rows if "eval_audio_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_audio_loss"] for r in evals], "o-", label="eval audio_loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.savefig(os.path.join(output_dir, "loss.png"), dpi=100)


def main(argv=None) -> None:
    cfg = config_from_args(argv)
    try:
        run_eval(cfg) if cfg.eval_only else train(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
