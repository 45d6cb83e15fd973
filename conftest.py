"""Shared test fixtures: a tiny random checkpoint with the demo tokenizer, a tiny audio tokenizer,
and training runs on the demo data (one way to start one, one way to kill one)."""
import os
import shutil

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEMO_DATA = os.path.join(ROOT, "demo", "data")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A saved tiny model (official layout) whose tokenizer is demo/tokenizer."""
    from checkpoint import save_checkpoint
    from model import HiggsConfig, build_model

    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    model = build_model(HiggsConfig.tiny(), seed=0)
    with torch.no_grad():  # larger weights than the default init, so differences show
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_checkpoint(model, path)
    tok_dir = os.path.join(ROOT, "demo", "tokenizer")
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return path


@pytest.fixture(scope="session")
def audio_tokenizer(tmp_path_factory) -> str:
    """A tiny random HiggsAudioV2TokenizerModel (demo/make_demo.py's config) saved like a real one,
    its codebooks random (transformers initialises them to zeros: every code would be 0)."""
    from demo.make_demo import build_audio_tokenizer

    model = build_audio_tokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.copy_(torch.randn(q.codebook.embed.shape, generator=g))
    path = str(tmp_path_factory.mktemp("audio_tokenizer"))
    model.save_pretrained(path)
    return path


@pytest.fixture
def run_train(tiny_ckpt):
    """run_train(output_dir, *flags): a short CPU training run on the demo data (6 steps, batch 2,
    a checkpoint every 3 steps, no evaluation); later flags override earlier ones."""
    import train

    def run(output_dir, *flags, model=tiny_ckpt):
        return train.train(train.parse(train.TrainConfig, [
            "--model", model, "--train_data", os.path.join(DEMO_DATA, "train.jsonl"),
            "--eval_data", "", "--output_dir", str(output_dir), "--max_steps", "6",
            "--batch_size", "2", "--save_every", "3", "--log_every", "100", "--lr", "5e-3",
            "--warmup_steps", "2", "--device", "cpu", *flags]))
    return run


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """kill_after_checkpoint(run, step): call `run()` (a training run) and kill it right after its
    step-`step` checkpoint is written, as a preemption would."""
    import train

    def kill(run, step: int) -> None:
        real_save = train.save_training_state

        def save_then_die(run_dir, d, position, *args):
            folder = real_save(run_dir, d, position, *args)
            if position["step"] == step:
                raise KeyboardInterrupt
            return folder

        monkeypatch.setattr(train, "save_training_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run()
        monkeypatch.setattr(train, "save_training_state", real_save)
    return kill


@pytest.fixture
def golden_records():
    """golden_records(case): (model, samples) of a case of tests/golden/ (tests/make_golden.py)."""
    from checkpoint import load_model, load_tokenizer
    from data import make_sample
    from formats import load_records

    def setup(case):
        folder = os.path.join(ROOT, "tests", "golden", case)
        model = load_model(os.path.join(folder, "ckpt"), dtype=torch.float32).eval()
        tok = load_tokenizer(os.path.join(folder, "ckpt"))
        records = load_records(os.path.join(folder, "data", "records.jsonl"))
        return model, [make_sample(r, tok, model.cfg) for r in records]
    return setup
