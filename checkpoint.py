"""Model checkpoints: where they come from (a local folder or a Hugging Face Hub id) and their two
layouts, converted here so that model.py knows one set of names.

- official (`boson_multimodal`, model_type `higgs_audio`): config with `text_config`, parameter
  names as in model.py (`layers.N.audio_mlp.gate_proj.weight`, `audio_decoder_proj.*`);
- transformers (`HiggsAudioV2ForConditionalGeneration`, model_type `higgs_audio_v2`): `model.`
  prefix, `embed_audio_tokens`, top-level heads, and a config without the <|AUDIO|> and
  <|audio_eos|> ids, which are taken from the checkpoint's tokenizer.
"""
from __future__ import annotations

import errno
import json
import os
import re

import torch

from errors import ConfigError, need_file
from model import HiggsAudioModel, HiggsConfig, build_model

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_TOKENIZER = os.path.join(HERE, "demo", "tokenizer")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve(name: str, what: str) -> str:
    """The local folder of `name`: itself when it is a folder, else a Hugging Face Hub id
    downloaded (or found in the cache) by huggingface_hub, which honours HF_TOKEN, HF_HOME /
    HF_HUB_CACHE and HF_HUB_OFFLINE. `what` names the flag in the one-line error."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name) or not HUB_ID.fullmatch(name):
        kind = "a file, not a folder" if os.path.exists(name) else "no such folder"
        raise ConfigError(f"{what} {name}: {kind}; give a checkpoint folder or a Hugging Face Hub "
                        "id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name)
    except LocalEntryNotFoundError:
        raise ConfigError(f"{what} {name}: not a local folder, and not in the Hugging Face cache while "
                        "offline (HF_HUB_OFFLINE=1 or no network); download it once with network "
                        f"access (`hf download {name}`) or give a local folder")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"{what} {name}: not a local folder, and the Hugging Face Hub did not serve "
                        f"it ({type(e).__name__}: {str(e).splitlines()[0]}); check the id, and "
                        "for a private or gated repository set HF_TOKEN")


# ----------------------------------------------------------------------------------------------
# config.json


def _rope_scaling(rs: dict | None) -> dict | None:
    kind = (rs or {}).get("rope_type", (rs or {}).get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3, default)")
    return {k: rs[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}


def _official_config(d: dict) -> HiggsConfig:
    t = d["text_config"]
    enc = d.get("audio_encoder_config") or {}
    n_layers = t["num_hidden_layers"]
    layers = d.get("audio_dual_ffn_layers")
    return HiggsConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_layers=n_layers,
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-5), rope_theta=t.get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(t.get("rope_scaling") or t.get("rope_parameters")),
        audio_adapter_type=d.get("audio_adapter_type", "dual_ffn_fast_forward"),
        audio_dual_ffn_layers=None if layers is None or sorted(layers) == list(range(n_layers))
        else list(layers),
        audio_num_codebooks=d.get("audio_num_codebooks", 12),
        audio_codebook_size=d.get("audio_codebook_size", 1024),
        audio_stream_bos_id=d.get("audio_stream_bos_id", 1024),
        audio_stream_eos_id=d.get("audio_stream_eos_id", 1025),
        audio_embed_avg=d.get("audio_embed_avg", False),
        use_delay_pattern=d.get("use_delay_pattern", False),
        encode_audio_in_tokens=d.get("encode_audio_in_tokens", False),
        encode_whisper_embed=d.get("encode_whisper_embed", True),
        skip_audio_tower=d.get("skip_audio_tower", False),
        audio_in_token_id=d.get("audio_in_token_idx", 128015),
        audio_out_token_id=d.get("audio_out_token_idx", 128016),
        audio_out_bos_token_id=d.get("audio_out_bos_token_id", 128013),
        audio_eos_token_id=d.get("audio_eos_token_id", 128012),
        pad_token_id=d.get("pad_token_id", 128001),
        whisper_d_model=enc.get("d_model", 1280), whisper_layers=enc.get("encoder_layers", 32),
        whisper_heads=enc.get("encoder_attention_heads", 20),
        whisper_ffn_dim=enc.get("encoder_ffn_dim", 5120),
        whisper_num_mel_bins=enc.get("num_mel_bins", 128),
        whisper_max_source_positions=enc.get("max_source_positions", 1500))


def _transformers_config(d: dict, token_id) -> HiggsConfig:
    """transformers' HiggsAudioV2: every layer DualFFN, delay pattern, no tower; its codebook_size
    counts the two stream tokens. Ids the config lacks come from `token_id(token)`."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return HiggsConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(rope), audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=None, audio_num_codebooks=d["num_codebooks"],
        audio_codebook_size=d["codebook_size"] - 2,
        audio_stream_bos_id=d.get("audio_stream_bos_id", d["codebook_size"] - 2),
        audio_stream_eos_id=d.get("audio_stream_eos_id", d["codebook_size"] - 1),
        use_delay_pattern=True, encode_audio_in_tokens=True, encode_whisper_embed=False,
        skip_audio_tower=True,
        audio_out_token_id=d.get("audio_token_id", token_id("<|AUDIO_OUT|>")),
        audio_out_bos_token_id=d.get("audio_bos_token_id", token_id("<|audio_out_bos|>")),
        audio_in_token_id=token_id("<|AUDIO|>"), audio_eos_token_id=token_id("<|audio_eos|>"),
        pad_token_id=d.get("pad_token_id", token_id("<|end_of_text|>")))


def read_config(ckpt_dir: str) -> HiggsConfig:
    """The HiggsConfig of a checkpoint folder in either layout."""
    path = need_file(os.path.join(ckpt_dir, "config.json"), "checkpoint config",
                     "--model is a Higgs-Audio checkpoint folder (config.json + *.safetensors + "
                     "tokenizer), a Hugging Face Hub id, or tiny", ConfigError)
    with open(path) as f:
        d = json.load(f)
    if d.get("model_type") == "higgs_audio_v2":
        tokenizer = load_tokenizer(ckpt_dir) \
            if os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json")) else None
        released = HiggsConfig()
        defaults = {"<|AUDIO|>": released.audio_in_token_id, "<|AUDIO_OUT|>": released.audio_out_token_id,
                    "<|audio_out_bos|>": released.audio_out_bos_token_id,
                    "<|audio_eos|>": released.audio_eos_token_id, "<|end_of_text|>": released.pad_token_id}
        return _transformers_config(d, lambda token: tokenizer.convert_tokens_to_ids(token)
                                    if tokenizer is not None else defaults[token])
    if d.get("model_type") not in (None, "higgs_audio"):
        raise ConfigError(f"{path} has model_type {d.get('model_type')!r}; expected 'higgs_audio' "
                        "(official) or 'higgs_audio_v2' (transformers)")
    try:
        return _official_config(d)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a Higgs-Audio config (no {e})")


def official_config(cfg: HiggsConfig) -> dict:
    """config.json in the official `higgs_audio` layout (what read_config reads back)."""
    text = dict(model_type="llama", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling, hidden_act="silu", attention_bias=False,
                mlp_bias=False, max_position_embeddings=131072, tie_word_embeddings=False,
                pad_token_id=cfg.pad_token_id)
    enc = dict(model_type="higgs_audio_encoder", d_model=cfg.whisper_d_model,
               encoder_layers=cfg.whisper_layers, encoder_attention_heads=cfg.whisper_heads,
               encoder_ffn_dim=cfg.whisper_ffn_dim, num_mel_bins=cfg.whisper_num_mel_bins,
               max_source_positions=cfg.whisper_max_source_positions)
    layers = cfg.audio_dual_ffn_layers
    return dict(
        model_type="higgs_audio", architectures=["HiggsAudioModel"], text_config=text,
        audio_encoder_config=enc, audio_adapter_type=cfg.audio_adapter_type,
        audio_dual_ffn_layers=list(range(cfg.num_layers)) if layers is None else layers,
        audio_num_codebooks=cfg.audio_num_codebooks, audio_codebook_size=cfg.audio_codebook_size,
        audio_stream_bos_id=cfg.audio_stream_bos_id, audio_stream_eos_id=cfg.audio_stream_eos_id,
        audio_embed_avg=cfg.audio_embed_avg, use_delay_pattern=cfg.use_delay_pattern,
        encode_audio_in_tokens=cfg.encode_audio_in_tokens,
        encode_whisper_embed=cfg.encode_whisper_embed, skip_audio_tower=cfg.skip_audio_tower,
        audio_in_token_idx=cfg.audio_in_token_id, audio_out_token_idx=cfg.audio_out_token_id,
        audio_out_bos_token_id=cfg.audio_out_bos_token_id,
        audio_eos_token_id=cfg.audio_eos_token_id, pad_token_id=cfg.pad_token_id,
        audio_decoder_proj_num_layers=0, use_audio_out_embed_projector=False,
        use_audio_out_self_attention=False, use_rq_transformer=False)


def transformers_config(cfg: HiggsConfig) -> dict:
    """config.json for transformers' HiggsAudioV2ForConditionalGeneration (all-DualFFN models)."""
    if cfg.audio_dual_ffn_layers is not None or cfg.has_audio_tower or not cfg.use_delay_pattern:
        raise ConfigError("the transformers higgs_audio_v2 layout only covers the released "
                        "architecture: every layer DualFFN, delay pattern, no audio tower; use "
                        "--format official")
    rope = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return dict(model_type="higgs_audio_v2", architectures=["HiggsAudioV2ForConditionalGeneration"],
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
                num_codebooks=cfg.audio_num_codebooks, codebook_size=cfg.codebook_rows,
                audio_token_id=cfg.audio_out_token_id, audio_bos_token_id=cfg.audio_out_bos_token_id,
                audio_stream_bos_id=cfg.audio_stream_bos_id,
                audio_stream_eos_id=cfg.audio_stream_eos_id, pad_token_id=cfg.pad_token_id,
                tie_word_embeddings=False, max_position_embeddings=131072)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(ckpt_dir: str):
    """The checkpoint's text tokenizer (a fast tokenizer: tokenizer.json + its config)."""
    from transformers import PreTrainedTokenizerFast

    need_file(os.path.join(ckpt_dir, "tokenizer.json"), "text tokenizer",
              "the checkpoint folder must carry its text tokenizer (tokenizer.json and "
              "tokenizer_config.json)", ConfigError)
    return PreTrainedTokenizerFast.from_pretrained(ckpt_dir)


def check_special_tokens(tokenizer, cfg: HiggsConfig) -> None:
    """The placeholder ids the collator expands must be the tokenizer's own."""
    for token, want in (("<|AUDIO|>", cfg.audio_in_token_id), ("<|AUDIO_OUT|>", cfg.audio_out_token_id)):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise ConfigError(f"tokenizer maps {token} to {got} but the model config says {want}: "
                            "load the tokenizer that belongs to the checkpoint")


def model_spec(model: str) -> tuple[object, HiggsConfig]:
    """(text tokenizer, HiggsConfig) of --model: `tiny`, a checkpoint folder or a Hub id. Cheap:
    no weights are read, so data can be validated before a GPU is touched."""
    if model == "tiny":
        tokenizer, cfg = load_tokenizer(TINY_TOKENIZER), HiggsConfig.tiny()
    else:
        path = resolve(model, "--model")
        cfg, tokenizer = read_config(path), load_tokenizer(path)
    check_special_tokens(tokenizer, cfg)
    return tokenizer, cfg


# ----------------------------------------------------------------------------------------------
# Weights

# transformers `higgs_audio_v2` name -> official name
_TRANSFORMERS_RENAMES = [
    ("model.embed_audio_tokens.embed_audio_tokens.weight", "audio_codebook_embeddings.weight"),
    ("audio_lm_head.weight", "audio_decoder_proj.audio_lm_head.weight"),
    ("text_lm_head.weight", "audio_decoder_proj.text_lm_head.weight"),
]


def official_name(name: str) -> str:
    for src, dst in _TRANSFORMERS_RENAMES:
        if name == src:
            return dst
    return name[len("model."):] if name.startswith("model.") else name


def transformers_name(name: str) -> str:
    for src, dst in _TRANSFORMERS_RENAMES:
        if name == dst:
            return src
    return "model." + name


def safetensors_files(ckpt_dir: str) -> list[str]:
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(ckpt_dir, s) for s in shards]
    return [need_file(os.path.join(ckpt_dir, "model.safetensors"), "checkpoint weights",
                      "a checkpoint folder holds model.safetensors or model.safetensors.index.json "
                      "with its shards", ConfigError)]


def load_model(ckpt_dir: str, device="cpu", dtype=torch.bfloat16) -> HiggsAudioModel:
    """Build on the meta device and load the checkpoint's tensors in place (assign=True)."""
    from safetensors import safe_open

    cfg = read_config(ckpt_dir)
    with torch.device("meta"):
        model = HiggsAudioModel(cfg)
    state = {}
    for path in safetensors_files(ckpt_dir):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                state[official_name(name)] = f.get_tensor(name).to(dtype)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {ckpt_dir} does not match its config.json: missing ({len(missing)}) "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected ({len(unexpected)}) "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; check that the folder "
            "holds a Higgs-Audio v2 checkpoint in the official or the transformers layout and that "
            "config.json belongs to these weights")
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model


def load(model: str, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> HiggsAudioModel:
    """--model: `tiny` (random, from `seed`), a checkpoint folder or a Hub id."""
    if model == "tiny":
        return build_model(HiggsConfig.tiny(), device=device, dtype=dtype, seed=seed)
    return load_model(resolve(model, "--model"), device=device, dtype=dtype)


def save_tensors(tensors: dict, path: str) -> None:
    """A safetensors file (written to a temporary file and renamed by safetensors itself),
    readable as the umask allows: safetensors creates files readable by their owner alone. Its
    own error type becomes an OSError, so a full disk is reported like any other write error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        raise OSError(errno.ENOSPC if "No space left" in str(e) else errno.EIO, str(e), path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint(model: HiggsAudioModel, out_dir: str, fmt: str = "official",
                    max_shard_bytes: int = 5 * 1024 ** 3, state: dict | None = None) -> None:
    """Write config.json + sharded safetensors (+ index when sharded) in the official or the
    transformers layout. `state` overrides the model's tensors (e.g. merged LoRA weights)."""
    config = official_config(model.cfg) if fmt == "official" else transformers_config(model.cfg)
    os.makedirs(out_dir, exist_ok=True)
    rename = transformers_name if fmt == "transformers" else (lambda n: n)
    state = {rename(k): v.detach().contiguous()
             for k, v in (state if state is not None else model.state_dict()).items()}
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_tensors(shards[0], os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, os.path.join(out_dir, fname))
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
