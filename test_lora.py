"""LoRA: a fresh adapter is the identity, merge equals the side path, sibling adapters share one
down-projection, only adapters (and chosen modules) train, and adapters load in PEFT and merge
into both checkpoint layouts."""
import copy
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import fp8
import lora
from checkpoint import load_model, load_tokenizer
from collate import Collator
from data import make_sample
from formats import load_records
from lora import LoRALinear, inject_lora, load_adapter, merged_state_dict, save_adapter, set_merged
from loss import Objective

EVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "data", "eval.jsonl")


def demo_batch(ckpt, n=3):
    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    samples = [make_sample(r, tok, model.cfg) for r in load_records(EVAL)[:n]]
    return model, Collator(model.cfg)(samples)


def outputs(model, batch):
    """Text and per-codebook audio loss sums: what training sees of the model."""
    with torch.no_grad():
        s = Objective(model.cfg).sums(model, model(batch), batch)
    return torch.cat([s["text"].view(1), s["audio"]])


def randomize_adapters(model, std=0.05):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std) if "lora_B" not in n else p.normal_(std=std)


def test_fresh_lora_is_identity_and_merge_matches(tiny_ckpt):
    model, batch = demo_batch(tiny_ckpt)
    model.eval()
    base = outputs(model, batch)
    wrapped = inject_lora(model, r=4, alpha=8)
    assert any("audio_mlp" in n for n in wrapped) and any("self_attn.q_proj" in n for n in wrapped)
    assert torch.equal(outputs(model, batch), base)  # B = 0: exactly the base model
    randomize_adapters(model)
    unmerged = outputs(model, batch)
    assert not torch.allclose(unmerged, base)
    set_merged(model, True)
    torch.testing.assert_close(outputs(model, batch), unmerged, rtol=1e-5, atol=1e-4)
    set_merged(model, False)
    torch.testing.assert_close(outputs(model, batch), unmerged, rtol=1e-6, atol=1e-5)


def test_sibling_loras_share_one_down_projection(tiny_ckpt):
    """q/k/v (and gate/up) run their A matrices as one GEMM; outputs and every gradient match
    the module-by-module path, and the model uses the grouped path only without dropout."""
    torch.manual_seed(0)
    mods = [LoRALinear(torch.nn.Linear(16, n, bias=False), r=4, alpha=8) for n in (16, 8, 8)]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = []
    for run in (lambda: lora.grouped_project(x, mods), lambda: [m(x) for m in mods]):
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
    torch.testing.assert_close(lora.grouped_project(x, mods)[1], results[0][1], rtol=1e-5, atol=1e-5)

    calls = []
    for dropout, groups in ((0.0, 3 * 3), (0.1, 0)):  # 3 layers x (attention, text FFN, audio FFN)
        model, _ = demo_batch(tiny_ckpt)
        inject_lora(model, r=4, alpha=8, dropout=dropout)
        grouped = [m for m in model.modules() if isinstance(m, lora.GroupedDown)]
        calls.append(len(grouped))
    assert calls == [9, 0]


def test_only_lora_and_chosen_modules_get_gradients(tiny_ckpt):
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8, targets="audio_mlp",
                trainable_modules="audio_decoder_proj.audio_lm_head")
    randomize_adapters(model)
    s = Objective(model.cfg).sums(model, model(batch), batch)
    (s["text"] + s["audio"].sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".audio_mlp." in n and ".lora_" in n or "audio_lm_head" in n
                             for n in with_grad), with_grad
    assert "audio_decoder_proj.audio_lm_head.weight" in with_grad
    assert not any("self_attn" in n or ".mlp." in n for n in with_grad)


def test_fp8_gemms_are_the_products_of_their_quantised_operands():
    """Both GEMMs of a frozen FP8 linear equal the same products of the dequantised operands (the
    tensor-wise kernel runs on CPU), and land within e4m3's rounding of the exact ones."""
    torch.manual_seed(0)
    x = torch.randn(40, 64, requires_grad=True)
    w, dy = torch.randn(48, 64) * 0.1, torch.randn(40, 48)
    w8, w_scale = fp8.quantize(w, rowwise=False)
    wt8, wt_scale = fp8.quantize(w.t().contiguous(), rowwise=False)
    y = fp8.Float8Matmul.apply(x, w8, w_scale, wt8, wt_scale, False)
    y.backward(dy)
    for t, rowwise in ((x, False), (x, True), (w, True)):  # the scales bound every element
        t8, scale = fp8.quantize(t.detach(), rowwise)
        assert t8.dtype == torch.float8_e4m3fn and t8.float().abs().max() <= 448
        torch.testing.assert_close(t8.float() * scale, t.detach(), rtol=0.0625, atol=1e-6)
    dequantised = [q.float() * s for q, s in (fp8.quantize(x.detach(), False), (w8, w_scale))]
    torch.testing.assert_close(y, dequantised[0] @ dequantised[1].t(), rtol=1e-5, atol=1e-5)
    dy_deq = [q.float() * s for q, s in (fp8.quantize(dy, False), (wt8, wt_scale))]
    torch.testing.assert_close(x.grad, dy_deq[0] @ dy_deq[1].t(), rtol=1e-5, atol=1e-5)
    for got, exact in ((y, x.detach() @ w.t()), (x.grad, dy @ w)):
        assert ((got - exact).norm() / exact.norm()) < 0.06


def test_fp8_rowwise_operands_meet_the_cuda_kernels_contract(monkeypatch):
    """Row-wise scaling runs on CUDA only; here a stand-in kernel checks what torch._scaled_mm
    demands there (a row-major left and column-major right fp8 matrix, dimensions in multiples of
    16, float32 scales of (M, 1) and (1, N)) and computes the product of the dequantised operands."""
    def scaled_mm(a, b, scale_a, scale_b, out_dtype):
        assert a.dtype == b.dtype == torch.float8_e4m3fn and a.is_contiguous() and b.t().is_contiguous()
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, b.shape[1])
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_b.is_contiguous()
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False).requires_grad_(False)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([linear])})
    assert fp8.use_fp8(model, "rowwise") == 1
    x = torch.randn(3, 7, 64, requires_grad=True)  # 21 rows: any number of rows is allowed
    y = model["layers"][0](x)
    y.backward(torch.ones_like(y))
    assert ((y - x @ linear.weight.t()).norm() / (x @ linear.weight.t()).norm()) < 0.06
    exact = torch.ones(21, 48) @ linear.weight
    assert ((x.grad.reshape(21, 64) - exact).norm() / exact.norm()) < 0.06


def test_fp8_refuses_what_it_cannot_run(monkeypatch):
    from errors import ConfigError

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    cases = [("cpu", (9, 0), torch.bfloat16, "the device is cpu"),
             ("cuda", (8, 0), torch.bfloat16, "NVIDIA A100 has 8.0"),
             ("cuda", (9, 0), torch.float32, "--dtype is float32; use --dtype bfloat16")]
    for device, capability, dtype, words in cases:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        with pytest.raises(ConfigError, match=re.escape(words)):
            fp8.check_fp8(torch.device(device), dtype)
    fp8.check_fp8(torch.device("cuda"), torch.bfloat16)  # an H100 under bf16 passes


def test_fp8_linears_train_like_bf16_and_leave_the_weights_and_adapters_alone(tiny_ckpt):
    """use_fp8 retypes every frozen linear of the layers (heads stay), keeps the state dict, and a
    step's adapter gradients follow the unconverted model's; a merged adapter runs its bf16 weight."""
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8, targets="audio_mlp")
    randomize_adapters(model)
    converted = copy.deepcopy(model)
    keys = set(model.state_dict())
    assert fp8.use_fp8(converted, "tensorwise") == 3 * (4 + 3 + 3)  # all of each layer's linears
    kinds = {n: type(m) for n, m in converted.named_modules()}
    assert kinds["layers.0.audio_mlp.up_proj"] is fp8.Float8LoRALinear
    assert kinds["layers.0.self_attn.q_proj"] is fp8.Float8Linear
    assert kinds["audio_decoder_proj.audio_lm_head"] is torch.nn.Linear
    assert set(converted.state_dict()) == keys
    grads = []
    for m in (model, converted):
        s = Objective(m.cfg).sums(m, m(batch), batch)
        (s["text"] + s["audio"].sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.99
    assert not torch.equal(*grads)  # the FP8 GEMMs ran
    set_merged(converted, True)
    up = converted.layers[0].audio_mlp.up_proj
    x = torch.randn(5, up.in_features)
    assert torch.equal(up(x), torch.nn.functional.linear(x, up.weight))


@pytest.mark.slow
def test_merge_cli_official_and_transformers(tiny_ckpt, tmp_path):
    model, batch = demo_batch(tiny_ckpt)
    inject_lora(model, r=4, alpha=8, trainable_modules="audio_decoder_proj.audio_lm_head")
    randomize_adapters(model)
    want = outputs(model, batch)
    save_adapter(model, str(tmp_path / "adapter"))
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["audio_decoder_proj.audio_lm_head"]
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert "base_model.model.layers.0.audio_mlp.gate_proj.lora_A.weight" in keys
    for fmt in ("official", "transformers"):
        out = tmp_path / fmt
        assert lora.main(["merge", "--model", tiny_ckpt, "--adapter", str(tmp_path / "adapter"),
                          "--out", str(out), "--format", fmt]) == 0
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
    randomize_adapters(model)
    want = outputs(model, batch)
    save_adapter(model, str(tmp_path / "adapter"))
    base = load_model(tiny_ckpt, dtype=torch.float32)
    wrapped = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(outputs(wrapped.base_model.model, batch), want, rtol=1e-5, atol=1e-4)
