"""LoRA injection, merge/export, and the training loop: resume, atomic checkpoints, DDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train as train_mod
from collate import Collator
from conftest import DEMO_DATA, ROOT, train_until_killed
from data import load_records, load_tokenizer, make_sample
from lora import LoRALinear, inject_lora, load_adapter, merged_state_dict, save_adapter, set_merged
from loss import loss_sums, voice_consistency_sums
from model import load_model

TRAIN = os.path.join(DEMO_DATA, "train.jsonl")
EVAL = os.path.join(DEMO_DATA, "eval.jsonl")


def demo_batch(ckpt, n=3):
    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    samples = [make_sample(r, tok, model.cfg) for r in load_records(EVAL)[:n]]
    return model, Collator(model.cfg)(samples)


def outputs(model, batch):
    with torch.no_grad():
        s = loss_sums(model, model(batch), batch)
    return torch.cat([s.text_sum.view(1), s.audio_sum])


def test_fresh_lora_is_identity_and_merge_matches(tiny_ckpt):
    model, batch = demo_batch(tiny_ckpt)
    model.eval()
    base = outputs(model, batch)
    wrapped = inject_lora(model, r=4, alpha=8)
    assert any("audio_mlp" in n for n in wrapped) and any("self_attn.q_proj" in n for n in wrapped)
    assert torch.equal(outputs(model, batch), base)  # B = 0: exactly the base model
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    unmerged = outputs(model, batch)
    assert not torch.allclose(unmerged, base)
    set_merged(model, True)
    torch.testing.assert_close(outputs(model, batch), unmerged, rtol=1e-5, atol=1e-4)
    set_merged(model, False)
    torch.testing.assert_close(outputs(model, batch), unmerged, rtol=1e-6, atol=1e-5)


def test_sibling_loras_share_one_down_projection():
    """q/k/v (and gate/up) run their A matrices as one GEMM; outputs and every gradient match
    the module-by-module path."""
    torch.manual_seed(0)
    mods = [LoRALinear(torch.nn.Linear(16, n, bias=False), r=4, alpha=8) for n in (16, 8, 8)]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = []
    for run in (lambda: LoRALinear.group_forward(x, mods), lambda: [m(x) for m in mods]):
        outs = run()
        sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)).backward()
        params = [p for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]
        results.append([o.detach() for o in outs] + [x.grad.clone()] + [p.grad.clone() for p in params])
        x.grad = None
        for p in params:
            p.grad = None
    for joint, separate in zip(*results):
        torch.testing.assert_close(joint, separate, rtol=1e-6, atol=1e-6)
    set_merged(torch.nn.ModuleList(mods), True)  # merged adapters take the plain path
    torch.testing.assert_close(LoRALinear.group_forward(x, mods)[1], results[1][1], rtol=1e-5, atol=1e-5)


def test_only_lora_and_chosen_modules_get_gradients(tiny_ckpt):
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8, targets="audio_mlp",
                trainable_modules="audio_decoder_proj.audio_lm_head")
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    s = loss_sums(model, model(batch), batch)
    (s.text_sum + s.audio_sum.sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".audio_mlp." in n and ".lora_" in n or "audio_lm_head" in n
                             for n in with_grad), with_grad
    assert "audio_decoder_proj.audio_lm_head.weight" in with_grad
    assert not any("self_attn" in n or ".mlp." in n for n in with_grad)


def test_merge_cli_official_and_transformers(tiny_ckpt, tmp_path):
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8, trainable_modules="audio_decoder_proj.audio_lm_head")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    want = outputs(model, batch)
    save_adapter(model, str(tmp_path / "adapter"))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["audio_decoder_proj.audio_lm_head"]
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert "base_model.model.layers.0.audio_mlp.gate_proj.lora_A.weight" in keys
    for fmt in ("official", "transformers"):
        out = tmp_path / fmt
        subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "merge", "--model", tiny_ckpt,
                        "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--format", fmt],
                       check=True, capture_output=True)
        assert os.path.isfile(out / "tokenizer.json")
        merged = load_model(str(out), dtype=torch.float32)
        torch.testing.assert_close(outputs(merged, batch), want, rtol=1e-5, atol=1e-4)
        if fmt == "transformers":  # and transformers itself gives the same audio logits
            from transformers import HiggsAudioV2ForConditionalGeneration

            from bench import baseline_inputs

            hf = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(out)).eval()
            inputs = baseline_inputs(batch, model.cfg)
            for key in ("labels", "audio_labels"):
                inputs.pop(key)
            with torch.no_grad():
                theirs = hf(**inputs).logits.view(-1, model.cfg.audio_num_codebooks,
                                                  model.cfg.codebook_rows)
                ours = merged.audio_logits(merged(batch).flatten(0, 1)[batch.audio_out_index])
            torch.testing.assert_close(theirs[batch.audio_out_index], ours, rtol=1e-4, atol=1e-4)
    # reloading the adapter onto a fresh base gives the same model
    fresh = load_model(tiny_ckpt, dtype=torch.float32)
    load_adapter(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(fresh, batch), want, rtol=1e-6, atol=1e-5)
    assert not any(".lora_" in k for k in merged_state_dict(fresh))


def test_peft_loads_adapter(tiny_ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(std=0.05)
    want = outputs(model, batch)
    save_adapter(model, str(tmp_path / "adapter"))
    base = load_model(tiny_ckpt, dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(wrapped.base_model.model, batch), want, rtol=1e-5, atol=1e-4)


def test_voice_consistency_term(tiny_ckpt):
    model, batch = demo_batch(tiny_ckpt)
    hidden = model(batch)
    vc, n = voice_consistency_sums(hidden, batch)
    assert int(n) == batch.input_ids.shape[0] and 0 < float(vc.detach()) < 2 * int(n)
    grad_vc = torch.autograd.grad(vc, model.norm.weight)[0]
    assert grad_vc.abs().sum() > 0  # a non-zero weight changes the gradient


def run_train(tmp, *extra, ckpt):
    args = ["--model", ckpt, "--train_data", TRAIN, "--eval_data", "", "--output_dir", str(tmp),
            "--max_steps", "6", "--batch_size", "2", "--save_every", "3", "--log_every", "100",
            "--lr", "5e-3", "--warmup_steps", "2", "--device", "cpu", *extra]
    return train_mod.train(train_mod.config_from_args(args))


def losses(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["text_loss"], r["audio_loss"]) for r in rows if "loss" in r]


def adapter(run_dir):
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def test_resume_is_exact_and_partial_checkpoints_are_ignored(tiny_ckpt, tmp_path, monkeypatch):
    full = tmp_path / "full"
    run_train(full, ckpt=tiny_ckpt)

    part = tmp_path / "part"
    train_until_killed(monkeypatch, lambda: run_train(part, ckpt=tiny_ckpt), step=3)

    # an interrupted write leaves only a .tmp folder, which --resume never picks
    def broken_adapter(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "save_adapter", broken_adapter)
    cfg = train_mod.config_from_args(["--output_dir", str(part), "--model", tiny_ckpt])
    with pytest.raises(OSError):
        train_mod.save_training_checkpoint(cfg, train_mod.Dist(), None, None, None, dict(step=4))
    monkeypatch.undo()
    assert os.path.isdir(part / "checkpoints" / ".tmp_step_00000004")
    cfg.resume = "latest"
    assert train_mod.resume_path(cfg).endswith("step_00000003")

    run_train(part, "--resume", ckpt=tiny_ckpt)
    assert losses(part) == losses(full)
    a, b = adapter(part), adapter(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_gloo_matches_one_process(tiny_ckpt, tmp_path):
    common = ["--model", tiny_ckpt, "--train_data", TRAIN, "--eval_data", "", "--max_steps", "3",
              "--save_every", "100", "--lora_dropout", "0", "--device", "cpu", "--lr", "5e-3",
              "--trainable_modules", "audio_decoder_proj.audio_lm_head"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533", os.path.join(ROOT, "train.py"), *common,
                    "--batch_size", "1", "--output_dir", str(tmp_path / "two")],
                   check=True, capture_output=True, env=env, cwd=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *common, "--batch_size", "2",
                    "--output_dir", str(tmp_path / "one")], check=True, capture_output=True,
                   env=env, cwd=ROOT)
    a, b = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert_same_adapter(a, b)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    # gradient norms expose any error in the global token normalisation (Adam would hide it)
    two, one = grad_norms(tmp_path / "two"), grad_norms(tmp_path / "one")
    assert np.allclose(two, one, rtol=1e-4) and np.allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def assert_same_adapter(a, b):
    """Equal up to float noise; Adam turns noise in near-zero gradients into lr-sized steps on
    single elements, so compare each tensor as a whole."""
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-3 * b[k].norm() + 1e-6, k


def grad_norms(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def test_grad_accum_matches_bigger_batch(tiny_ckpt, tmp_path):
    base = ["--max_steps", "3", "--lora_dropout", "0", "--save_every", "100"]
    run_train(tmp_path / "accum", *base, "--batch_size", "1", "--grad_accum", "2", ckpt=tiny_ckpt)
    run_train(tmp_path / "big", *base, "--batch_size", "2", ckpt=tiny_ckpt)
    a, b = adapter(tmp_path / "accum"), adapter(tmp_path / "big")
    assert_same_adapter(a, b)
    assert np.allclose(grad_norms(tmp_path / "accum"), grad_norms(tmp_path / "big"), rtol=1e-4)


def test_demo_run_loss_decreases(tmp_path):
    """The embedded default (tiny model, bundled data) learns: loss well below where it started."""
    result = train_mod.train(train_mod.config_from_args(
        ["--output_dir", str(tmp_path), "--max_steps", "40", "--device", "cpu", "--save_every", "100"]))
    rows = losses(tmp_path)
    first = rows[0][1] + rows[0][2]
    last = np.mean([t + a for _, t, a in rows[-5:]])
    assert last < 0.6 * first, (first, last)
    assert rows[-1][2] < rows[0][2]  # the audio loss itself goes down
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "eval_audio_loss" in result


def test_non_finite_step_is_skipped_then_stops(tiny_ckpt, tmp_path, monkeypatch, capsys):
    real = train_mod.loss_sums
    calls = {"n": 0}

    def poisoned(model, hidden, batch):  # every forward from the 2nd on gives a NaN loss
        calls["n"] += 1
        sums = real(model, hidden, batch)
        if calls["n"] >= 2:
            sums.text_sum = sums.text_sum * float("nan")
        return sums

    monkeypatch.setattr(train_mod, "loss_sums", poisoned)
    with pytest.raises(SystemExit, match="consecutive non-finite"):
        run_train(tmp_path, "--max_bad_steps", "2", "--save_every", "1", ckpt=tiny_ckpt)
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient" in out and "step skipped" in out
    # the skipped steps changed nothing: the adapter saved at step 1 is what is left
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]


def test_activation_checkpointing_gives_same_gradients(tiny_ckpt):
    grads = []
    for ac in (False, True):
        model, batch = demo_batch(tiny_ckpt)
        torch.manual_seed(0)
        inject_lora(model, r=4, alpha=8)
        with torch.no_grad():
            for _, m in model.named_modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.weight.normal_(std=0.05)
        model.train()
        model.activation_checkpointing = ac
        s = loss_sums(model, model(batch), batch)
        (s.text_sum + s.audio_sum.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_sharded_checkpoint_and_bf16_load(tiny_ckpt, tmp_path):
    from model import save_checkpoint

    model, batch = demo_batch(tiny_ckpt)
    save_checkpoint(model, str(tmp_path), max_shard_bytes=200_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(str(tmp_path), dtype=torch.float32)
    assert torch.equal(outputs(again, batch), outputs(model, batch))
    half = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_length_grouped_steps_cover_the_epoch_once():
    lengths = [int(x) for x in torch.randint(50, 2000, (1000,), generator=torch.Generator().manual_seed(0))]
    grouped = train_mod.step_indices(1000, 8, seed=0, epoch=3, lengths=lengths)
    plain = train_mod.step_indices(1000, 8, seed=0, epoch=3)
    for steps in (grouped, plain):
        flat = [i for s in steps for i in s]
        assert len(steps) == 125 and all(len(s) == 8 for s in steps) and len(set(flat)) == 1000
    spread = lambda steps: np.mean([max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps])  # noqa: E731
    assert spread(grouped) < 0.2 * spread(plain)
    assert grouped == train_mod.step_indices(1000, 8, seed=0, epoch=3, lengths=lengths)  # deterministic
