"""Hand-written LoRA for Higgs-Audio v2, including the DualFFN audio FFNs.

A LoRA linear is a side path  y = W x + (alpha / r) * B(A(dropout(x)))  with A Kaiming-uniform
and B zeros, so a fresh adapter leaves the model unchanged. The frozen base weight keeps its
original parameter name (`...q_proj.weight`), so checkpoints load unchanged; the adapter adds
`...q_proj.lora_A.weight` / `...lora_B.weight`.

Adapters are written in the PEFT layout (`adapter_model.safetensors` + `adapter_config.json`,
keys `base_model.model.<module>.lora_A.weight`), whose module paths are those of the official
model. Merge into a full checkpoint with:

    python lora.py merge --model CKPT --adapter DIR --out OUT [--format official|transformers]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

# Named target groups; anything else given to --lora_targets is a regex on module names.
TARGET_GROUPS = {
    "attn": r"layers\.\d+\.self_attn\.[qkvo]_proj",
    "mlp": r"layers\.\d+\.mlp\.(gate|up|down)_proj",
    "audio_mlp": r"layers\.\d+\.audio_mlp\.(gate|up|down)_proj",
}
DEFAULT_TARGETS = "attn,mlp,audio_mlp"
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """nn.Linear with a trainable low-rank side path; the base weight stays frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # the side path runs in the activation dtype (bf16 in training); masters stay fp32
        return self.combine(x, F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype)))

    def combine(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """W x + (alpha/r) B low, for low = A dropout(x). The scaling multiplies the small B
        instead of the (positions, out) product: one pass less over the activations."""
        scaled_b = (self.lora_B.weight * self.scaling).to(x.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(low, scaled_b)

    @staticmethod
    def group_forward(x: torch.Tensor, modules) -> list[torch.Tensor]:
        """Several linears on one input (q/k/v, gate/up). When all are unmerged LoRA linears
        without dropout, their down-projections run as one GEMM x @ [A_1; A_2; ...]^T: x is read
        once instead of once per module, and forward and backward launch one A-side GEMM each
        instead of one per module (README, Performance). With dropout each module keeps its own
        mask, as in PEFT."""
        if not all(isinstance(m, LoRALinear) and not m.merged and isinstance(m.dropout, nn.Identity)
                   for m in modules):
            return [m(x) for m in modules]
        a = torch.cat([m.lora_A.weight for m in modules]).to(x.dtype)
        low = F.linear(x, a).split([m.r for m in modules], dim=-1)
        return [m.combine(x, d) for m, d in zip(modules, low)]

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


def target_regexes(targets: str) -> list[str]:
    return [TARGET_GROUPS.get(t.strip(), t.strip()) for t in targets.split(",") if t.strip()]


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                targets: str = DEFAULT_TARGETS, trainable_modules: str = "") -> list[str]:
    """Freeze the model, wrap every nn.Linear whose name fullmatches a target regex, and make the
    modules named in `trainable_modules` (comma-separated regexes) fully trainable.
    Returns the wrapped module names."""
    regexes = target_regexes(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(re.fullmatch(rx, name) for rx in regexes):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--lora_targets {targets!r} matched no linear layer; named groups are "
                         f"{', '.join(TARGET_GROUPS)}, anything else is a regex on module names "
                         "such as 'layers\\.\\d+\\.self_attn\\.q_proj'")
    for rx in [t.strip() for t in trainable_modules.split(",") if t.strip()]:
        hits = [n for n, _ in model.named_modules() if re.fullmatch(rx, n)]
        if not hits:
            raise ValueError(f"--trainable_modules {rx!r} matched no module "
                             "(e.g. 'audio_decoder_proj.audio_lm_head')")
        for n in hits:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=targets,
                             trainable_modules=trainable_modules, target_modules=wrapped)
    return wrapped


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_merged(model: nn.Module, merged: bool) -> None:
    for _, m in lora_modules(model):
        m.merge() if merged else m.unmerge()


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (LoRA A/B and fully trainable modules) under its model name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Adapter files (PEFT layout)


def save_adapter(model: nn.Module, out_dir: str, base_model: str = "") -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = model.lora_config
    tensors = {PEFT_PREFIX + n: t.float().contiguous().cpu() for n, t in trainable_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    extra = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()
                    if _.requires_grad and ".lora_" not in n})
    peft_config = {
        "peft_type": "LORA", "task_type": None, "r": cfg["r"], "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"], "target_modules": cfg["target_modules"], "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": extra or None, "base_model_name_or_path": base_model,
        "use_rslora": False, "use_dora": False,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)


def read_adapter(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise FileNotFoundError(f"{adapter_dir}/{name} not found: --adapter must be a folder "
                                    "written by train.py (OUT/adapter or a checkpoint's adapter/)")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return config, {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v
                    for k, v in tensors.items()}


def load_adapter(model: nn.Module, adapter_dir: str) -> None:
    """Inject LoRA as the adapter's config says and load its weights."""
    config, tensors = read_adapter(adapter_dir)
    exact = lambda names: ",".join(re.escape(n) for n in names or [])  # noqa: E731
    inject_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                targets=exact(config["target_modules"]),
                trainable_modules=exact(config.get("modules_to_save")))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"adapter {adapter_dir} has tensors this model lacks: {unknown[:10]}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta folded into its weight (no lora_* keys)."""
    state = {}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        state[name] = t
    for name, m in lora_modules(model):
        w = m.weight.float() if m.merged else m.weight.float() + m.delta_weight().float()
        state[name + ".weight"] = w.to(m.weight.dtype)
    return state


# ----------------------------------------------------------------------------------------------
# CLI: merge


def merge_cli(argv=None) -> None:
    from model import load_model, save_checkpoint, safetensors_files

    p = argparse.ArgumentParser(description="Merge a LoRA adapter into a full checkpoint.")
    p.add_argument("command", choices=["merge"])
    p.add_argument("--model", required=True, help="base checkpoint folder")
    p.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--format", choices=["official", "transformers"], default="official")
    args = p.parse_args(argv)

    files = safetensors_files(args.model)
    from safetensors import safe_open

    with safe_open(files[0], framework="pt") as f:
        dtype = f.get_tensor(next(iter(f.keys()))).dtype
    model = load_model(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter)
    state = {k: v.to(dtype) for k, v in merged_state_dict(model).items()}
    shard_bytes = max(os.path.getsize(f) for f in files) if len(files) > 1 else 1 << 62
    save_checkpoint(model, args.out, fmt=args.format, max_shard_bytes=shard_bytes, state=state)
    for name in os.listdir(args.model):  # tokenizer and other side files travel along
        src = os.path.join(args.model, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and \
                name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy2(src, os.path.join(args.out, name))
    print(f"merged {args.adapter} into {args.model} -> {args.out} ({args.format} layout)")


if __name__ == "__main__":
    merge_cli()
