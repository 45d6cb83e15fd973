"""The helpers of rehearse.sh, a rehearsal of the whole workflow on a node before a long run:
synthetic assets at the released shape (random weights: nothing is downloaded), each stage run
and measured, and the summary.

    python3 rehearse.py assets WORK [--tiny]     # WORK/model, WORK/audio_tokenizer, WORK/data/*
    python3 rehearse.py stage WORK NAME [--kill_when GLOB] -- COMMAND ...
    python3 rehearse.py report WORK              # the summary: one JSON line
    python3 rehearse.py corpus DIR [--clips N] [--lengths 1,20] [--codebook_size 1024]
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

from cli import option, parse

DEMO_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "tokenizer")
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing near an old "
         "bridge in the warm morning light and people walk slowly to the market").split()


# Synthetic assets
def released_tokenizer(out_dir: str) -> None:
    """The demo tokenizer with its 256 special tokens moved to the released ids (128000+): the
    ids in between are unused vocabulary entries, so the vocabulary is the released 128256."""
    with open(os.path.join(DEMO_TOKENIZER, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    shift = 128000 - len(vocab)
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), 128000)})
    for token in tok["added_tokens"]:
        token["id"] += shift
    for special in tok["post_processor"]["special_tokens"].values():
        special["ids"] = [i + shift for i in special["ids"]]
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(DEMO_TOKENIZER, name), out_dir)


def write_model(out_dir: str, tiny: bool) -> None:
    """A random checkpoint in the official layout, sharded like the released one (5 GB shards)."""
    from checkpoint import save_checkpoint
    from model import HiggsConfig, random_model

    cfg = HiggsConfig.tiny() if tiny else HiggsConfig.released()
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    save_checkpoint(random_model(cfg, device, torch.float32 if tiny else torch.bfloat16), out_dir,
                    max_shard_bytes=5 * 10 ** 9)
    if tiny:
        for name in os.listdir(DEMO_TOKENIZER):
            shutil.copy(os.path.join(DEMO_TOKENIZER, name), out_dir)
    else:
        released_tokenizer(out_dir)


def write_audio_tokenizer(out_dir: str, tiny: bool) -> None:
    """HiggsAudioV2TokenizerModel at the released settings (transformers' default hop is 320, not
    960) or the demo's; random codebooks, since transformers' zeros would make every code 0."""
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    if tiny:
        from demo.make_demo import build_audio_tokenizer

        model = build_audio_tokenizer()
    else:
        torch.manual_seed(0)
        model = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig(
            target_bandwidths=[0.5, 1, 1.5, 2],
            acoustic_model_config={"downsampling_ratios": [8, 5, 4, 2, 3],
                                   "upsampling_ratios": [8, 5, 4, 2, 3]}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.copy_(torch.randn(q.codebook.embed.shape, generator=g))
    model.save_pretrained(out_dir)


def write_clips(folder: str, speakers: int, clips: int, seconds: tuple, seed: int) -> float:
    """`speakers` folders of `clips` voiced tones (some 44.1 kHz stereo, some 16 kHz, to exercise
    the resampling) with transcripts of ~14 characters a second. Returns the seconds written."""
    rng, total = np.random.default_rng(seed), 0.0
    for s in range(speakers):
        pitch = rng.uniform(90, 250)
        for c in range(clips):
            rate, channels = [(24000, 1), (44100, 2), (16000, 1)][(s + c) % 3]
            duration = rng.uniform(*seconds)
            t = np.arange(int(duration * rate)) / rate
            voice = sum(np.sin(2 * np.pi * pitch * k * t * (1 + 0.05 * np.sin(3 * t))) / k
                        for k in range(1, 6))
            wave = 0.2 * voice * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))
            wave = np.stack([wave] * channels, 1) + 0.01 * rng.standard_normal((len(t), channels))
            stem = os.path.join(folder, f"speaker{s:02d}", f"clip{c:02d}")
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            sf.write(stem + ".wav", wave.astype(np.float32), rate, subtype="PCM_16")
            words = rng.choice(WORDS, max(2, int(duration * 14 / 5))).tolist()
            with open(stem + ".txt", "w") as f:
                f.write(" ".join(words).capitalize() + ".\n")
            total += duration
    return total


def assets(work: str, tiny: bool) -> None:
    write_model(os.path.join(work, "model"), tiny)
    write_audio_tokenizer(os.path.join(work, "audio_tokenizer"), tiny)
    seconds = (0.6, 1.4) if tiny else (3.0, 7.0)
    audio = write_clips(os.path.join(work, "data", "train"), 4 if tiny else 20, 6 if tiny else 10,
                        seconds, seed=1)
    write_clips(os.path.join(work, "data", "eval"), 2, 2 if tiny else 3, seconds, seed=2)
    with open(os.path.join(work, "assets.json"), "w") as f:
        json.dump({"train_audio_seconds": audio}, f)


# Stages
def gpu_memory_used() -> list[float]:
    """GiB in use on each GPU, as nvidia-smi sees it (every process counted)."""
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        return [float(x) / 1024 for x in out.split()]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its workers in sessions of their own, so killing
    a process group would leave them running."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stage(work: str, name: str, command: list[str], kill_when: str = "") -> int:
    """Run `command`, measured into WORK/stages.jsonl; with `kill_when`, SIGKILL it and all below it
    once a file matches that glob (a preemption). A glob, since keep-last deletes older checkpoints:
    one marker could come and go between two polls."""
    peak, done = [], threading.Event()

    def poll():
        while not done.is_set():
            used = gpu_memory_used()
            peak[:] = [max(a, b) for a, b in zip(peak, used)] if peak else used
            done.wait(0.5)
    threading.Thread(target=poll, daemon=True).start()
    start = time.time()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        if kill_when and glob.glob(kill_when):
            for pid in [proc.pid] + descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    done.set()
    host = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # its largest process
    row = dict(stage=name, start=start, seconds=round(time.time() - start, 1), rc=proc.returncode,
               peak_gpu_gib=round(max(peak), 2) if peak else None, peak_host_gib=round(host, 2))
    with open(os.path.join(work, "stages.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"rehearse: {name}: {row['seconds']} s, rc {proc.returncode}", flush=True)
    if not kill_when:
        return proc.returncode
    if proc.returncode == -signal.SIGKILL:
        return 0
    if proc.returncode == 0:
        print(f"rehearse: {name} ended before {kill_when} appeared, so the kill and resume were "
              "not rehearsed: give it more steps after the first checkpoint", file=sys.stderr)
    return proc.returncode or 1


# The summary
def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def first_step_seconds(run_rows: list[dict], started: float) -> float:
    """From the stage's start to the first training step's start: loading and compiling."""
    first = next(r for r in run_rows if "loss" in r)
    return round(first["time"] - first["step_seconds"] - started, 1)


def report(work: str) -> dict:
    stages = {s["stage"]: s for s in rows(os.path.join(work, "stages.jsonl"))}
    run = rows(os.path.join(work, "run", "metrics.jsonl"))
    checkpoints = [r for r in run if "checkpoint_seconds" in r]
    steady = [r for r in run if "loss" in r and r["step"] > 2]
    resumed = stages["resume"]["start"]
    evals = {name: json.load(open(os.path.join(work, name, "eval.json")))
             for name in ("eval_adapter", "eval_merged_official", "eval_merged_transformers")}
    audio_hours = json.load(open(os.path.join(work, "assets.json")))["train_audio_seconds"] / 3600
    out = dict(
        stages={n: {k: s[k] for k in ("seconds", "peak_gpu_gib", "peak_host_gib", "rc")}
                for n, s in stages.items()},
        loading_to_first_step_s=first_step_seconds(run, stages["train"]["start"]),
        steady_step_s=statistics.median(r["step_seconds"] for r in steady),
        positions_per_s=statistics.median(r["positions_per_s"] for r in steady),
        checkpoint_seconds=checkpoints[0]["checkpoint_seconds"],
        checkpoint_mib=checkpoints[0]["checkpoint_mib"],
        resume_to_first_step_s=first_step_seconds(
            [r for r in run if r.get("time", 0) > resumed], resumed),
        prepare_audio_hours_per_minute=audio_hours / (stages["prepare"]["seconds"] / 60),
        merged_eval_max_abs_diff=max(
            abs(evals[m][k] - evals["eval_adapter"][k]) for m in evals if m != "eval_adapter"
            for k in ("text_loss", "audio_loss")))
    one_gpu = os.path.join(work, "one_gpu", "metrics.jsonl")
    if os.path.isfile(one_gpu):
        world = json.load(open(os.path.join(work, "run", "config.json")))["world_size"]
        out.update(world_size=world, **against_one_gpu(run, rows(one_gpu), world, resumed))
    return out


def against_one_gpu(run_rows: list[dict], one_gpu_rows: list[dict], world: int,
                    resumed: float) -> dict:
    """The run on `world` GPUs against one GPU stepping through the same global batches: scaling
    efficiency (a median, so that one step recompiling in one run alone does not decide it) and
    the largest step loss difference. Only the run's first process is timed: a process's first
    epoch is slower, so a resumed one must not be set against the reference's later steps."""
    alone, mine = ({r["step"]: r for r in rs if "loss" in r} for rs in (one_gpu_rows, run_rows))
    first_process = [s for s, r in mine.items() if r["time"] <= resumed]
    timed = sorted(set(first_process[2:]) & set(sorted(alone)[2:]))
    return dict(
        scaling_steps=len(timed),
        scaling_efficiency=statistics.median(
            alone[s]["step_seconds"] / (world * mine[s]["step_seconds"]) for s in timed)
        if timed else None,
        loss_max_abs_diff_to_one_gpu=max(
            (abs(mine[s]["loss"] - alone[s]["loss"]) for s in alone.keys() & mine.keys()),
            default=None))


def corpus(out: str, clips: int, lengths: tuple[float, float], codebook_size: int,
           per_speaker: int = 50) -> None:
    """A realistic-length corpus for bench.py --data and scale tests: log-normal durations (median
    6 s), speaker folders, train.jsonl, random codes sidecars; the WAVs are silent and sparse."""
    from audio import CODES_SAMPLE_RATE, expected_frames, save_codes
    from chatml import cloning_record

    rng = np.random.default_rng(0)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.6, clips), *lengths)
    records = []
    for c, sec in enumerate(seconds):
        speaker, n = f"speaker{c // per_speaker:04d}", int(sec * CODES_SAMPLE_RATE)
        stem = os.path.join(out, "train", speaker, f"clip{c:07d}")
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        with open(stem + ".wav", "wb") as f:  # a 16-bit mono WAV header, then n samples as a hole
            f.write(struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 2 * n, b"WAVE", b"fmt ", 16, 1,
                                1, CODES_SAMPLE_RATE, 2 * CODES_SAMPLE_RATE, 2, 16, b"data", 2 * n))
            f.truncate(44 + 2 * n)
        save_codes(stem + ".wav", rng.integers(0, codebook_size, (8, expected_frames(
            n, CODES_SAMPLE_RATE)), dtype=np.int16), "random codes (rehearse.py corpus)")
        text = " ".join(rng.choice(WORDS, max(2, int(sec * 14 / 5)))).capitalize() + "."
        with open(stem + ".txt", "w") as f:
            f.write(text + "\n")
        records.append((speaker, os.path.relpath(stem + ".wav", out), text))
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for i, (speaker, audio, text) in enumerate(records):
            j = i + 1 if i + 1 < len(records) and records[i + 1][0] == speaker else \
                i - i % per_speaker
            f.write(json.dumps(cloning_record(records[j][2], records[j][1], text, audio, speaker))
                    + "\n")
    print(f"corpus: {clips} clips, {seconds.sum() / 3600:.1f} h in {out}")


def flag_value(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


@dataclass
class CorpusConfig:
    """python3 rehearse.py corpus DIR [flags]: a realistic-length corpus in DIR"""
    clips: int = option(1000, "clips to write", min=1)
    lengths: str = option("1,20", "shortest,longest clip in seconds (log-normal, median 6 s)")
    codebook_size: int = option(1024, "random codes in [0, N)", min=1)

    def __post_init__(self):
        self.seconds()  # a bad --lengths fails in cli.parse: one line, exit 2

    def seconds(self) -> tuple[float, float]:
        """--lengths as (shortest, longest)."""
        try:
            lengths = tuple(float(x) for x in self.lengths.split(","))
        except ValueError:
            lengths = ()
        if len(lengths) != 2 or not 0 < lengths[0] <= lengths[1] <= 600:
            raise ValueError(f"--lengths {self.lengths}: need shortest,longest with 0 < shortest "
                             "<= longest <= 600")
        return lengths


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("corpus", "assets", "stage", "report") or \
            argv[1].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    command, work = argv[0], argv[1]
    if command == "corpus":
        c = parse(CorpusConfig, argv[2:], CorpusConfig.__doc__)
        corpus(work, c.clips, c.seconds(), c.codebook_size)
    elif command == "assets":
        assets(work, "--tiny" in argv)
    elif command == "stage":
        split = argv.index("--")
        return stage(work, argv[2], argv[split + 1:], flag_value(argv[:split], "--kill_when", ""))
    elif command == "report":
        print(json.dumps(report(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
