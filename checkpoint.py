"""Model checkpoints, from a local folder or a Hugging Face Hub id, in either layout, converted here
so that model.py knows one set of names: official (`boson_multimodal`, model_type `higgs_audio`,
names as in model.py) or transformers (`higgs_audio_v2`: `model.` prefix, `embed_audio_tokens`,
top-level heads, and no <|AUDIO|> or <|audio_eos|> id in its config: its tokenizer has them)."""
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
    """The local folder of `name`: itself, or a Hub id fetched by huggingface_hub (which honours
    HF_TOKEN, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE). `what` names the flag in errors."""
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
        raise ConfigError(f"{what} {name}: not a local folder, and not in the Hugging Face cache "
                          "while offline (HF_HUB_OFFLINE=1 or no network); download it once with "
                          f"network access (`hf download {name}`) or give a local folder")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ConfigError(f"{what} {name}: not a local folder, and the Hugging Face Hub did not "
                          f"serve it ({type(e).__name__}: {str(e).splitlines()[0]}); check the id, "
                          "and for a private or gated repository set HF_TOKEN")


# config.json

# HiggsConfig field -> key of a Llama config: the official text_config, transformers' top level
LLAMA_KEYS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                  intermediate_size="intermediate_size", num_layers="num_hidden_layers",
                  num_heads="num_attention_heads", num_kv_heads="num_key_value_heads",
                  head_dim="head_dim", rms_norm_eps="rms_norm_eps")
# HiggsConfig field -> key of the official audio_encoder_config (HiggsConfig's defaults are its own)
WHISPER_KEYS = dict(whisper_d_model="d_model", whisper_layers="encoder_layers",
                    whisper_heads="encoder_attention_heads", whisper_ffn_dim="encoder_ffn_dim",
                    whisper_num_mel_bins="num_mel_bins",
                    whisper_max_source_positions="max_source_positions")
# official top-level key -> its default when absent (the official HiggsAudioConfig's)
OFFICIAL_AUDIO = dict(audio_num_codebooks=12, audio_codebook_size=1024, audio_stream_bos_id=1024,
                      audio_stream_eos_id=1025, audio_embed_avg=False, use_delay_pattern=False,
                      encode_audio_in_tokens=False, encode_whisper_embed=True,
                      skip_audio_tower=False, audio_in_token_idx=128015,
                      audio_out_token_idx=128016, audio_out_bos_token_id=128013,
                      audio_eos_token_id=128012, pad_token_id=128001)
OFFICIAL_FIELD = {"audio_in_token_idx": "audio_in_token_id",
                  "audio_out_token_idx": "audio_out_token_id"}
# HiggsConfig field -> its token, for the ids transformers' config may lack
SPECIAL_TOKENS = dict(audio_in_token_id="<|AUDIO|>", audio_out_token_id="<|AUDIO_OUT|>",
                      audio_out_bos_token_id="<|audio_out_bos|>",
                      audio_eos_token_id="<|audio_eos|>", pad_token_id="<|end_of_text|>")


def _rope_scaling(rs: dict | None) -> dict | None:
    kind = (rs or {}).get("rope_type", (rs or {}).get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3, default)")
    return {k: rs[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings")}


def _backbone(t: dict) -> dict:
    """HiggsConfig's Llama fields; a Llama config may leave out the last three."""
    heads = t["num_attention_heads"]
    optional = dict(num_kv_heads=heads, head_dim=t["hidden_size"] // heads, rms_norm_eps=1e-5)
    return {f: (t.get(k) or optional[f]) if f in optional else t[k] for f, k in LLAMA_KEYS.items()}


def _official_config(d: dict) -> HiggsConfig:
    t, enc = d["text_config"], d.get("audio_encoder_config") or {}
    layers = d.get("audio_dual_ffn_layers")
    every = layers is None or sorted(layers) == list(range(t["num_hidden_layers"]))
    return HiggsConfig(
        **_backbone(t), rope_theta=t.get("rope_theta", 10000.0),
        rope_scaling=_rope_scaling(t.get("rope_scaling") or t.get("rope_parameters")),
        audio_adapter_type=d.get("audio_adapter_type", "dual_ffn_fast_forward"),
        audio_dual_ffn_layers=None if every else list(layers),
        **{OFFICIAL_FIELD.get(k, k): d.get(k, v) for k, v in OFFICIAL_AUDIO.items()},
        **{f: enc.get(k, getattr(HiggsConfig, f)) for f, k in WHISPER_KEYS.items()})


def _transformers_config(d: dict, tokenizer) -> HiggsConfig:
    """transformers' HiggsAudioV2 is the released architecture (HiggsConfig's defaults); its
    codebook_size counts the two stream tokens. Ids it lacks: the tokenizer's, else the released."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    ids = {f: getattr(HiggsConfig, f) if tokenizer is None else tokenizer.convert_tokens_to_ids(t)
           for f, t in SPECIAL_TOKENS.items()}
    return HiggsConfig(
        **_backbone(d), rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(rope), audio_num_codebooks=d["num_codebooks"],
        audio_codebook_size=d["codebook_size"] - 2,
        audio_stream_bos_id=d.get("audio_stream_bos_id", d["codebook_size"] - 2),
        audio_stream_eos_id=d.get("audio_stream_eos_id", d["codebook_size"] - 1),
        audio_in_token_id=ids["audio_in_token_id"],
        audio_out_token_id=d.get("audio_token_id", ids["audio_out_token_id"]),
        audio_out_bos_token_id=d.get("audio_bos_token_id", ids["audio_out_bos_token_id"]),
        audio_eos_token_id=ids["audio_eos_token_id"],
        pad_token_id=d.get("pad_token_id", ids["pad_token_id"]))


def read_config(ckpt_dir: str) -> HiggsConfig:
    """The HiggsConfig of a checkpoint folder in either layout."""
    path = need_file(os.path.join(ckpt_dir, "config.json"), "checkpoint config",
                     "--model is a Higgs-Audio checkpoint folder (config.json + *.safetensors + "
                     "tokenizer), a Hugging Face Hub id, or tiny", ConfigError)
    with open(path) as f:
        d = json.load(f)
    if d.get("model_type") == "higgs_audio_v2":
        has_tokenizer = os.path.isfile(os.path.join(ckpt_dir, "tokenizer.json"))
        return _transformers_config(d, load_tokenizer(ckpt_dir) if has_tokenizer else None)
    if d.get("model_type") not in (None, "higgs_audio"):
        raise ConfigError(f"{path} has model_type {d.get('model_type')!r}; expected 'higgs_audio' "
                          "(official) or 'higgs_audio_v2' (transformers)")
    try:
        return _official_config(d)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a Higgs-Audio config (no {e})")


def official_config(cfg: HiggsConfig) -> dict:
    """config.json in the official `higgs_audio` layout (what read_config reads back)."""
    text = dict(model_type="llama", **{k: getattr(cfg, f) for f, k in LLAMA_KEYS.items()},
                rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, hidden_act="silu",
                attention_bias=False, mlp_bias=False, max_position_embeddings=131072,
                tie_word_embeddings=False, pad_token_id=cfg.pad_token_id)
    enc = dict(model_type="higgs_audio_encoder",
               **{k: getattr(cfg, f) for f, k in WHISPER_KEYS.items()})
    layers = cfg.audio_dual_ffn_layers
    return dict(
        model_type="higgs_audio", architectures=["HiggsAudioModel"], text_config=text,
        audio_encoder_config=enc, audio_adapter_type=cfg.audio_adapter_type,
        audio_dual_ffn_layers=list(range(cfg.num_layers)) if layers is None else layers,
        **{k: getattr(cfg, OFFICIAL_FIELD.get(k, k)) for k in OFFICIAL_AUDIO},
        audio_decoder_proj_num_layers=0, use_audio_out_embed_projector=False,
        use_audio_out_self_attention=False, use_rq_transformer=False)


def transformers_config(cfg: HiggsConfig) -> dict:
    """config.json for transformers' HiggsAudioV2ForConditionalGeneration (all-DualFFN models)."""
    if cfg.audio_dual_ffn_layers is not None or cfg.has_audio_tower or not cfg.use_delay_pattern:
        raise ConfigError("the transformers higgs_audio_v2 layout only covers the released "
                          "architecture: every layer DualFFN, delay pattern, no audio tower; use "
                          "--format official")
    rope = dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    return dict(
        model_type="higgs_audio_v2", architectures=["HiggsAudioV2ForConditionalGeneration"],
        **{k: getattr(cfg, f) for f, k in LLAMA_KEYS.items()}, rope_parameters=rope,
        num_codebooks=cfg.audio_num_codebooks, codebook_size=cfg.codebook_rows,
        audio_token_id=cfg.audio_out_token_id, audio_bos_token_id=cfg.audio_out_bos_token_id,
        audio_stream_bos_id=cfg.audio_stream_bos_id, audio_stream_eos_id=cfg.audio_stream_eos_id,
        pad_token_id=cfg.pad_token_id, tie_word_embeddings=False, max_position_embeddings=131072)


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
    for field in ("audio_in_token_id", "audio_out_token_id"):
        token, want = SPECIAL_TOKENS[field], getattr(cfg, field)
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise ConfigError(f"tokenizer maps {token} to {got} but the model config says {want}: "
                              "load the tokenizer that belongs to the checkpoint")


def model_spec(model: str) -> tuple[object, HiggsConfig]:
    """(text tokenizer, HiggsConfig) of --model: `tiny`, a checkpoint folder or a Hub id. Cheap:
    no weights are read, so data can be validated before a GPU is touched."""
    path = TINY_TOKENIZER if model == "tiny" else resolve(model, "--model")
    cfg = HiggsConfig.tiny() if model == "tiny" else read_config(path)
    tokenizer = load_tokenizer(path)
    check_special_tokens(tokenizer, cfg)
    return tokenizer, cfg


# Weights: the transformers names that are not the official ones behind a `model.` prefix
OFFICIAL_NAMES = {
    "model.embed_audio_tokens.embed_audio_tokens.weight": "audio_codebook_embeddings.weight",
    "audio_lm_head.weight": "audio_decoder_proj.audio_lm_head.weight",
    "text_lm_head.weight": "audio_decoder_proj.text_lm_head.weight"}
TRANSFORMERS_NAMES = {official: name for name, official in OFFICIAL_NAMES.items()}


def official_name(name: str) -> str:
    return OFFICIAL_NAMES.get(name, name.removeprefix("model."))


def transformers_name(name: str) -> str:
    return TRANSFORMERS_NAMES.get(name, "model." + name)


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

    with torch.device("meta"):
        model = HiggsAudioModel(read_config(ckpt_dir))
    state = {}
    for path in safetensors_files(ckpt_dir):
        with safe_open(path, framework="pt", device=str(device)) as f:
            state.update({official_name(n): f.get_tensor(n).to(dtype) for n in f.keys()})
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {ckpt_dir} does not match its config.json: missing ({len(missing)}) "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected ({len(unexpected)}) "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}; check that the folder "
            "holds a Higgs-Audio v2 checkpoint in the official or the transformers layout and "
            "that config.json belongs to these weights")
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers(device)
    return model


def load(model: str, device="cpu", dtype=torch.bfloat16, seed: int = 0) -> HiggsAudioModel:
    """--model: `tiny` (random, from `seed`), a checkpoint folder or a Hub id."""
    if model == "tiny":
        return build_model(HiggsConfig.tiny(), device=device, dtype=dtype, seed=seed)
    return load_model(resolve(model, "--model"), device=device, dtype=dtype)


def save_tensors(tensors: dict, path: str) -> None:
    """A safetensors file readable as the umask allows (safetensors makes it owner-only), its
    errors raised as OSError so that a full disk is reported like any other write error."""
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
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    files = files if len(shards) > 1 else ["model.safetensors"]
    for fname, shard in zip(files, shards):
        save_tensors(shard, os.path.join(out_dir, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {n: fname for fname, shard in zip(files, shards) for n in shard}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
