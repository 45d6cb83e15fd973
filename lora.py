"""Hand-written LoRA for Higgs-Audio v2, including the DualFFN audio FFNs.

A LoRA linear is a side path  y = W x + (alpha / r) * B(A(dropout(x)))  with A Kaiming-uniform
and B zeros, so a fresh adapter leaves the model unchanged. The frozen base weight keeps its name
(`...q_proj.weight`), so checkpoints load unchanged. Adapters are written in the PEFT layout
(`adapter_model.safetensors` + `adapter_config.json`, keys `base_model.model.<module>.lora_A.weight`
with the official model's module paths). Merge into a full checkpoint with:

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

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from cli import option, parse
from errors import ConfigError, UserError, io_error, need_file
from model import MLP, Attention, plain_type, replace_modules, retyped

TARGET_GROUPS = {
    "attn": r"layers\.\d+\.self_attn\.[qkvo]_proj",
    "mlp": r"layers\.\d+\.mlp\.(gate|up|down)_proj",
    "audio_mlp": r"layers\.\d+\.audio_mlp\.(gate|up|down)_proj",
}
TARGETS_HELP = (f"named groups are {', '.join(TARGET_GROUPS)}, anything else is a regex on "
                "module names")
DEFAULT_TARGETS = "attn,mlp,audio_mlp"
PEFT_PREFIX = "base_model.model."
BASE_MODEL_FILE = "base_model.json"  # beside the adapter: the --model and --seed it was trained on


@dataclass
class LoRAConfig:
    """LoRA adapter"""
    lora_r: int = option(16, "rank of each adapter", min=1, max=4096, on_resume="fixed")
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

    def check(self) -> None:
        for flag, text in (("--lora_targets", self.lora_targets),
                           ("--trainable_modules", self.trainable_modules)):
            for rx in target_regexes(text):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"{flag} {rx!r}: not a regular expression ({e}); "
                                      + TARGETS_HELP)


def target_regexes(text: str) -> list[str]:
    return [TARGET_GROUPS.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]


class LoRALinear(nn.Module):
    """nn.Linear with a trainable low-rank side path; the base weight stays frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        fp32 = dict(bias=False, device=base.weight.device, dtype=torch.float32)  # the masters
        self.lora_A = nn.Linear(self.in_features, r, **fp32)
        self.lora_B = nn.Linear(r, self.out_features, **fp32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # the side path runs in the activation dtype (bf16 in training)
        return self.combine(x, F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype)))

    def combine(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """W x + (alpha/r) B low, for low = A dropout(x). The scaling multiplies the small B
        instead of the (positions, out) product: one pass less over the activations."""
        scaled_b = (self.lora_B.weight * self.scaling).to(x.dtype)
        return self.base(x) + F.linear(low, scaled_b)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen W x (fp8.Float8LoRALinear runs it in FP8)."""
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def set_merged(self, merged: bool) -> None:
        """Fold the side path into the base weight (one GEMM to run), or take it back out."""
        if merged != self.merged:
            delta = self.delta_weight().to(self.weight.dtype)
            self.weight += delta if merged else -delta
            self.merged = merged


def grouped_project(x: torch.Tensor, modules: list[LoRALinear]) -> list[torch.Tensor]:
    """Sibling LoRA linears on one input, their down-projections as one GEMM x @ [A_1; A_2; ...]^T:
    x is read once, and one A-side GEMM runs instead of one per module (merged: the plain path)."""
    if any(m.merged for m in modules):
        return [m(x) for m in modules]
    a = torch.cat([m.lora_A.weight for m in modules]).to(x.dtype)
    low = F.linear(x, a).split([m.r for m in modules], dim=-1)
    return [m.combine(x, d) for m, d in zip(modules, low)]


class GroupedDown:
    """Training: the sibling linears' adapters have no dropout, so they share one A-side GEMM."""

    def project(self, x) -> list[torch.Tensor]:
        return grouped_project(x, [getattr(self, n) for n in self.projections])


class GroupedLoRAAttention(GroupedDown, Attention):
    """Attention whose q/k/v adapters share one down-projection GEMM."""


class GroupedLoRAMLP(GroupedDown, MLP):
    """SwiGLU whose gate/up adapters share one down-projection GEMM."""


def group_projections(model: nn.Module) -> tuple[int, int]:
    """Group each Attention / MLP whose siblings are all LoRA linears without dropout (with dropout
    each keeps its own mask, as in PEFT); make the others plain (a fused one would skip adapters).
    Returns (grouped, all) of those modules."""
    grouped = {Attention: GroupedLoRAAttention, MLP: GroupedLoRAMLP}

    def make(_, m):
        base = plain_type(m)
        if base is None:
            return None
        siblings = [getattr(m, n) for n in m.projections]
        want = grouped[base] if all(isinstance(s, LoRALinear) and isinstance(s.dropout, nn.Identity)
                                    for s in siblings) else base
        return retyped(m, want) if type(m) is not want else None
    replace_modules(model, make)
    kinds = [type(m) for m in model.modules() if plain_type(m)]
    return sum(k in grouped.values() for k in kinds), len(kinds)


def inject_lora(model: nn.Module, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                targets: str = DEFAULT_TARGETS, trainable_modules: str = "") -> list[str]:
    """Freeze the model, wrap each nn.Linear whose name fullmatches a target regex, unfreeze the
    `trainable_modules` regexes' modules, and group the down-projections; the wrapped names."""
    regexes = target_regexes(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []

    def wrap(name, module):
        if isinstance(module, nn.Linear) and any(re.fullmatch(rx, name) for rx in regexes):
            wrapped.append(name)
            return LoRALinear(module, r, alpha, dropout)
    replace_modules(model, wrap)
    if not wrapped:
        raise ConfigError(f"--lora_targets {targets!r} matched no linear layer; {TARGETS_HELP} "
                          "such as 'layers\\.\\d+\\.self_attn\\.q_proj'")
    for rx in target_regexes(trainable_modules):
        hits = [m for n, m in model.named_modules() if re.fullmatch(rx, n)]
        if not hits:
            raise ConfigError(f"--trainable_modules {rx!r} matched no module "
                              "(e.g. 'audio_decoder_proj.audio_lm_head')")
        for module in hits:
            module.requires_grad_(True)
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, target_modules=wrapped,
                             grouped=group_projections(model))
    return wrapped


def describe_lora(model: nn.Module) -> str:
    """A line for the log: what inject_lora wrapped, and where the down-projections are grouped."""
    c = model.lora_config
    grouped, total = c["grouped"]
    line = f"LoRA: {len(c['target_modules'])} linears, r={c['r']}; down-projections grouped in " \
           f"{grouped} of {total} attention/FFN modules"
    if grouped < total:
        line += " (the others run one GEMM per linear: " + \
            ("--lora_dropout > 0 gives each its own mask)" if c["dropout"] else
             "not all of their q/k/v or gate/up linears are targets)")
    return line


def lora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def set_merged(model: nn.Module, merged: bool) -> None:
    for _, m in lora_modules(model):
        m.set_merged(merged)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (LoRA A/B and fully trainable modules) under its model name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# Adapter files, in the PEFT layout ------------------------------------------------------------
def save_adapter(model: nn.Module, out_dir: str, base_model: str = "", seed: int = 0) -> None:
    """The adapter in the PEFT layout, and BASE_MODEL_FILE: the base it was trained on (with the
    seed, which builds `tiny`), so that it can be merged wherever it is copied."""
    os.makedirs(out_dir, exist_ok=True)
    c = model.lora_config
    state = trainable_state_dict(model)
    checkpoint.save_tensors({PEFT_PREFIX + n: t.float().contiguous().cpu() for n, t in state.items()},
                            os.path.join(out_dir, "adapter_model.safetensors"))
    extra = sorted({n.rsplit(".", 1)[0] for n in state if ".lora_" not in n})
    peft_config = {"peft_type": "LORA", "task_type": None, "r": c["r"], "lora_alpha": c["alpha"],
                   "lora_dropout": c["dropout"], "target_modules": c["target_modules"],
                   "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                   "inference_mode": True, "modules_to_save": extra or None,
                   "base_model_name_or_path": base_model, "use_rslora": False, "use_dora": False}
    for name, content in (("adapter_config.json", peft_config),
                          (BASE_MODEL_FILE, dict(model=base_model, seed=seed))):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)


def read_adapter(adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {model parameter name: tensor}); a damaged file is a ConfigError."""
    from safetensors.torch import load_file

    paths = [need_file(os.path.join(adapter_dir, name), "adapter file", "--adapter is a folder "
                       "written by train.py (OUT/adapter or a checkpoint's adapter/), or a Hub id of "
                       "one", ConfigError)
             for name in ("adapter_config.json", "adapter_model.safetensors")]
    try:
        with open(paths[0]) as f:
            config = json.load(f)
        if not (isinstance(config["r"], int) and isinstance(config["lora_alpha"], (int, float))
                and isinstance(config["target_modules"], list)):
            raise TypeError("r, lora_alpha or target_modules of the wrong type")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"adapter file {paths[0]}: not an adapter config ({type(e).__name__}: "
                          f"{e}); copy the folder again from the run, or retrain")
    try:
        tensors = load_file(paths[1])
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"adapter file {paths[1]}: unreadable ({str(e).splitlines()[0]}): a "
                          "truncated or damaged copy; copy it again from the run (a checkpoint's "
                          "adapter/ holds the same)")
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def copy_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load an adapter's tensors into a model that already carries that adapter's LoRA layout."""
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"adapter {source} has tensors this model lacks: {unknown[:5]}; it was "
                          "trained on another base model or with other --lora_targets")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise ConfigError(f"adapter {source}: {name} has shape {tuple(t.shape)}, this "
                                  f"model's is {tuple(params[name].shape)} (another --lora_r or "
                                  "base model)")
            params[name].copy_(t.to(params[name].dtype))


def load_adapter(model: nn.Module, adapter_dir: str) -> None:
    """Inject LoRA as the adapter's config says and load its weights."""
    adapter_dir = checkpoint.resolve(adapter_dir, "--adapter")
    config, tensors = read_adapter(adapter_dir)
    exact = lambda names: ",".join(re.escape(n) for n in names or [])  # noqa: E731
    inject_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                targets=exact(config["target_modules"]),
                trainable_modules=exact(config.get("modules_to_save")))
    copy_adapter_weights(model, tensors, adapter_dir)


def base_seed(adapter_dir: str) -> int:
    """The seed that built the adapter's `tiny` base: from its BASE_MODEL_FILE, or for an older
    adapter without one, from the config.json of the run or checkpoint folder holding it."""
    for path in (os.path.join(adapter_dir, BASE_MODEL_FILE),
                 os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                return int(json.load(f).get("seed", 0))
    raise ConfigError(f"--adapter {adapter_dir}: no {BASE_MODEL_FILE} saying which seed built its "
                      "tiny base model; copy it along with the adapter, or merge from the run folder")


def load_base(model: str, adapter: str = "", device="cpu", dtype=torch.float32):
    """--model for an adapter: `tiny` is rebuilt from the seed the adapter was trained with."""
    seed = base_seed(checkpoint.resolve(adapter, "--adapter")) if model == "tiny" and adapter else 0
    return checkpoint.load(model, device, dtype, seed)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model state dict with every LoRA delta folded into its weight (no lora_* keys)."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_" not in name}
    for name, m in lora_modules(model):
        w = m.weight.float() if m.merged else m.weight.float() + m.delta_weight().float()
        state[name + ".weight"] = w.to(m.weight.dtype)
    return state


# python lora.py merge -------------------------------------------------------------------------
@dataclass
class MergeConfig:
    """Merge a LoRA adapter into a full checkpoint."""
    model: str = option("", "base checkpoint: a folder, a Hugging Face Hub id, or tiny (the demo's "
                        "random model, rebuilt from the seed the adapter was trained with)")
    adapter: str = option("", "adapter folder (adapter_model.safetensors + adapter_config.json) "
                          "or Hub id")
    out: str = option("", "output checkpoint folder (must not exist, or be empty)")
    format: str = option("official", "layout of the merged checkpoint: official (boson_multimodal "
                         "names, same shards) or transformers (HiggsAudioV2ForConditionalGeneration)",
                         choices=("official", "transformers"))


def merge(cfg: MergeConfig) -> None:
    """Writes into a temporary folder beside --out and renames it into place: a failure (a full
    disk) leaves no partial checkpoint behind."""
    for flag in ("model", "adapter", "out"):
        if not getattr(cfg, flag):
            raise ConfigError(f"--{flag} is required")
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        kind = "folder is not empty" if os.path.isdir(out) else "is a file"
        raise ConfigError(f"--out {cfg.out}: {kind}; give a new folder")
    if cfg.model == "tiny":
        base, files = checkpoint.TINY_TOKENIZER, []
        model = load_base("tiny", cfg.adapter)
    else:
        from safetensors import safe_open

        base = checkpoint.resolve(cfg.model, "--model")
        files = checkpoint.safetensors_files(base)
        with safe_open(files[0], framework="pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        model = checkpoint.load_model(base, dtype=dtype)  # merged_state_dict adds in fp32
    load_adapter(model, cfg.adapter)
    shard_bytes = max(os.path.getsize(f) for f in files) if len(files) > 1 else 1 << 62
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp{os.getpid()}")
    try:
        checkpoint.save_checkpoint(model, tmp, fmt=cfg.format, max_shard_bytes=shard_bytes,
                                   state=merged_state_dict(model))  # in the checkpoint's dtype
        for name in os.listdir(base):  # the tokenizer and other side files travel along
            src = os.path.join(base, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and \
                    name not in ("model.safetensors.index.json", "config.json"):
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except OSError as e:
        raise io_error(e, tmp, "writing the merged checkpoint")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {cfg.adapter} into {cfg.model} -> {cfg.out} ({cfg.format} layout)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "merge":
        print("usage: python lora.py merge --model CKPT --adapter DIR --out OUT "
              "[--format official|transformers]  (see python lora.py merge --help)", file=sys.stderr)
        return 2
    try:
        merge(parse(MergeConfig, argv[1:], MergeConfig.__doc__))
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
