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

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatml import DataError, need_file
from cli import option, parse
from model import projection_groups

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


def grouped_project(x: torch.Tensor, modules: list[LoRALinear]) -> list[torch.Tensor]:
    """Sibling LoRA linears on one input (q/k/v, gate/up) with their down-projections as one
    GEMM x @ [A_1; A_2; ...]^T: x is read once, and forward and backward launch one A-side GEMM
    instead of one per module. Merged adapters take the plain path."""
    if any(m.merged for m in modules):
        return [m(x) for m in modules]
    a = torch.cat([m.lora_A.weight for m in modules]).to(x.dtype)
    low = F.linear(x, a).split([m.r for m in modules], dim=-1)
    return [m.combine(x, d) for m, d in zip(modules, low)]


def share_down_projections(model: nn.Module) -> int:
    """Give every module whose `project(x)` applies sibling linears (model.Attention: q/k/v,
    model.MLP: gate/up) the grouped version, when all its siblings are LoRA linears without
    dropout (with dropout each keeps its own mask, as in PEFT). Returns the groups made."""
    groups = 0
    for module, siblings in projection_groups(model):
        if all(isinstance(m, LoRALinear) and isinstance(m.dropout, nn.Identity) for m in siblings):
            module.project = partial(grouped_project, modules=siblings)
            groups += 1
    return groups


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                targets: str = DEFAULT_TARGETS, trainable_modules: str = "") -> list[str]:
    """Freeze the model, wrap every nn.Linear whose name fullmatches a target regex, and make the
    modules named in `trainable_modules` (comma-separated regexes) fully trainable.
    Returns the wrapped module names."""
    regexes = [TARGET_GROUPS.get(t.strip(), t.strip()) for t in targets.split(",") if t.strip()]
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(re.fullmatch(rx, name) for rx in regexes):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, r, alpha, dropout))
            parent.__dict__.pop("project", None)  # a fused projection would skip the adapter
            wrapped.append(name)
    if not wrapped:
        raise DataError(f"--lora_targets {targets!r} matched no linear layer; named groups are "
                        f"{', '.join(TARGET_GROUPS)}, anything else is a regex on module names "
                        "such as 'layers\\.\\d+\\.self_attn\\.q_proj'")
    for rx in [t.strip() for t in trainable_modules.split(",") if t.strip()]:
        hits = [n for n, _ in model.named_modules() if re.fullmatch(rx, n)]
        if not hits:
            raise DataError(f"--trainable_modules {rx!r} matched no module "
                            "(e.g. 'audio_decoder_proj.audio_lm_head')")
        for n in hits:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    share_down_projections(model)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, target_modules=wrapped)
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
    from checkpoint import save_tensors

    os.makedirs(out_dir, exist_ok=True)
    cfg = model.lora_config
    state = trainable_state_dict(model)
    save_tensors({PEFT_PREFIX + n: t.float().contiguous().cpu() for n, t in state.items()},
                 os.path.join(out_dir, "adapter_model.safetensors"))
    extra = sorted({n.rsplit(".", 1)[0] for n in state if ".lora_" not in n})
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
    """(adapter_config.json, {model parameter name: tensor}) of an adapter folder."""
    from safetensors.torch import load_file

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        need_file(os.path.join(adapter_dir, name), "adapter file", "--adapter is a folder written by "
                  "train.py (OUT/adapter or a checkpoint's adapter/), or a Hub id of one")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def copy_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load an adapter's tensors into a model that already carries that adapter's LoRA layout."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise DataError(f"adapter {source} has tensors this model lacks: {unknown[:5]}; it was "
                        "trained on another base model or with other --lora_targets")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise DataError(f"adapter {source}: {name} has shape {tuple(t.shape)}, this model's "
                                f"is {tuple(params[name].shape)} (another --lora_r or base model)")
            params[name].copy_(t.to(params[name].dtype))


def load_adapter(model: nn.Module, adapter_dir: str) -> None:
    """Inject LoRA as the adapter's config says and load its weights."""
    from checkpoint import resolve

    adapter_dir = resolve(adapter_dir, "--adapter")
    config, tensors = read_adapter(adapter_dir)
    exact = lambda names: ",".join(re.escape(n) for n in names or [])  # noqa: E731
    inject_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                targets=exact(config["target_modules"]),
                trainable_modules=exact(config.get("modules_to_save")))
    copy_adapter_weights(model, tensors, adapter_dir)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta folded into its weight (no lora_* keys)."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for name, m in lora_modules(model):
        w = m.weight.float() if m.merged else m.weight.float() + m.delta_weight().float()
        state[name + ".weight"] = w.to(m.weight.dtype)
    return state


# ----------------------------------------------------------------------------------------------
# python lora.py merge


@dataclass
class MergeConfig:
    """Merge a LoRA adapter into a full checkpoint."""
    model: str = option("", "base checkpoint: a folder, a Hugging Face Hub id, or tiny (the demo's "
                        "random model, rebuilt from the seed in the adapter's run config.json)")
    adapter: str = option("", "adapter folder (adapter_model.safetensors + adapter_config.json) "
                          "or Hub id")
    out: str = option("", "output checkpoint folder (must not exist, or be empty)")
    format: str = option("official", "layout of the merged checkpoint: official (boson_multimodal "
                         "names, same shards) or transformers (HiggsAudioV2ForConditionalGeneration)",
                         choices=("official", "transformers"))


def tiny_seed(adapter_dir: str) -> int:
    """The seed the demo's tiny base model was built from: in the config.json of the run or
    checkpoint folder that holds the adapter (0, train.py's default, if there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("seed", 0))
    return 0


def merge(cfg: MergeConfig) -> None:
    import checkpoint

    for flag in ("model", "adapter", "out"):
        if not getattr(cfg, flag):
            raise DataError(f"--{flag} is required")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise DataError(f"--out {cfg.out}: folder is not empty; give a new folder")
    if cfg.model == "tiny":
        base, files = checkpoint.TINY_TOKENIZER, []
        model = checkpoint.load("tiny", dtype=torch.float32, seed=tiny_seed(cfg.adapter))
    else:
        from safetensors import safe_open

        base = checkpoint.resolve(cfg.model, "--model")
        files = checkpoint.safetensors_files(base)
        with safe_open(files[0], framework="pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        model = checkpoint.load_model(base, dtype=dtype)  # merged_state_dict adds in fp32
    load_adapter(model, cfg.adapter)
    state = merged_state_dict(model)  # in the checkpoint's dtype, as the model was loaded
    shard_bytes = max(os.path.getsize(f) for f in files) if len(files) > 1 else 1 << 62
    checkpoint.save_checkpoint(model, cfg.out, fmt=cfg.format, max_shard_bytes=shard_bytes,
                               state=state)
    for name in os.listdir(base):  # the tokenizer and other side files travel along
        src = os.path.join(base, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and \
                name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy2(src, os.path.join(cfg.out, name))
    print(f"merged {cfg.adapter} into {cfg.model} -> {cfg.out} ({cfg.format} layout)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "merge":
        print("usage: python lora.py merge --model CKPT --adapter DIR --out OUT "
              "[--format official|transformers]  (see python lora.py merge --help)", file=sys.stderr)
        return 2
    try:
        merge(parse(MergeConfig, argv[1:], MergeConfig.__doc__))
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
