"""transformers integration: HyperMoETransformer as a Hugging Face causal LM (AutoModelForCausalLM, generate, pipeline).

`import hypermoe.hf` registers HyperMoEHFConfig (model_type "hypermoe") with AutoConfig and HyperMoEForCausalLM with
AutoModelForCausalLM and AutoTokenizer (a folder's tokenizer.json, read by PreTrainedTokenizerFast). After it, a
hypermoe model directory of kind "model" (config.json + weights.npz or weights.safetensors, as
HyperMoETransformer.save_dir, `hypermoe train` and `hypermoe convert` write it) is a folder that
`AutoModelForCausalLM.from_pretrained(folder)` and `pipeline("text-generation", model=folder)` load, and
`save_pretrained` writes one that `HyperMoETransformer.from_dir` reads (ref.io.save_dir, atomically).

One formulation: HyperMoEForCausalLM.forward calls HyperMoETransformer.forward; this module only translates
transformers' conventions. The KV cache: transformers 5 passes a Cache object (`cache=`; `past_key_values=` is the
4.x and deprecated 5.x name of the same argument); its layers hold each block's keys and values (B, H, P, c), which
is the model's own past_key_values layout (Optimum's): the P cached positions go in as a tuple, and the S new keys
and values the model returns after them go into the cache with cache.update. A tuple of (key, value) pairs (4.x's
legacy cache) is accepted too and answered with a tuple.

Axis legend: B sequences, S new positions, P cached positions, H heads, c head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GenerationMixin, PretrainedConfig,
    PreTrainedModel, PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

import ref.io
from ref.config import SPEC_VERSION, HyperMoEConfig
from hypermoe.layer import params_to_ref
from hypermoe.model import HyperMoETransformer, check_logits_to_keep

OLDEST_TRANSFORMERS = (4, 46, 3)  # the oldest version tests/test_hf.py passed on (pyproject's hf extra)
if tuple(int(p) for p in transformers.__version__.split(".")[:3] if p.isdigit()) < OLDEST_TRANSFORMERS:
    raise ImportError(f"hypermoe.hf needs transformers ≥ {'.'.join(map(str, OLDEST_TRANSFORMERS))}, found "
                      f"{transformers.__version__} (pip install 'hypermoe[hf]')")

HYPERMOE_FIELDS = tuple(f.name for f in dataclasses.fields(HyperMoEConfig))
# from_pretrained's keyword arguments that concern downloading (AutoModelForCausalLM and pipeline pass them along):
# a local model directory needs none of them
HUB_KWARGS = {"cache_dir", "force_download", "local_files_only", "proxies", "token", "revision", "_from_auto",
              "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision", "use_safetensors"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# the output field generate() reads the cache from: "cache" in transformers 5, "past_key_values" in 4.x
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclasses.dataclass(repr=False, eq=False)  # eq: transformers' own (every attribute)
class HyperMoEHFConfig(PretrainedConfig):
    """transformers' view of a HyperMoEConfig (kind "model"): the hypermoe fields as attributes, under their own
    names (hidden_size, num_hidden_layers, num_attention_heads, max_position_embeddings are aliases), validated by
    HyperMoEConfig; `to_hypermoe()` gives the frozen config back. Token ids as in any transformers config."""

    model_type = ref.io.MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "max_position_embeddings": "max_seq_len"}
    # a declared field: transformers takes an undeclared config attribute named like a generation setting for one
    # (and generate() refuses it); hypermoe's top_k is the number of experts per token
    top_k: int = 1

    def __init__(self, **kwargs) -> None:
        kind = kwargs.pop("kind", "model")
        if kind != "model":
            raise ValueError(f"a transformers model loads a hypermoe directory of kind 'model', this one is kind {kind!r}")
        version = kwargs.pop("spec_version", SPEC_VERSION)
        ours = {name: kwargs.pop(name) for name in HYPERMOE_FIELDS if name in kwargs}
        fields = {name: kwargs[name] for name in ref.io.TRANSFORMERS_FIELDS if kwargs.get(name) is not None}
        cfg, _, _ = ref.io.config_from_fields({"spec_version": version, "kind": kind, **ours, **fields})
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)  # transformers' name for the same fact
        use_cache = kwargs.pop("use_cache", True)  # transformers pops it as a generation setting; forward's default
        super().__init__(**kwargs)
        self.use_cache = use_cache
        for name, value in cfg.to_dict().items():
            setattr(self, name, value)

    @classmethod
    def from_hypermoe(cls, config: HyperMoEConfig, **token_ids) -> HyperMoEHFConfig:
        return cls(**config.to_dict(), **token_ids)

    def to_hypermoe(self) -> HyperMoEConfig:
        return HyperMoEConfig(**{name: getattr(self, name) for name in HYPERMOE_FIELDS})

    def token_ids(self) -> dict:
        """{bos/eos/pad_token_id: id} of the ids that are set (what ref.io.save_dir writes into config.json)."""
        return {name: getattr(self, name, None) for name in ref.io.TOKEN_ID_FIELDS
                if getattr(self, name, None) is not None}


class HyperMoEGenerationConfig(GenerationConfig):
    """The generation settings of a HyperMoEHFConfig: only its token ids. transformers derives a model's default
    generation settings from its config's attributes, and hypermoe's `top_k` (experts per token) would become
    sampling's top-k there."""

    @classmethod
    def from_model_config(cls, model_config) -> HyperMoEGenerationConfig:
        return cls(**model_config.token_ids())


class HyperMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """A HyperMoETransformer (`self.model`) behind transformers' causal-LM interface.

    forward(input_ids (B, S), attention_mask (B, P + S), position_ids (B or 1, S), cache, use_cache, labels,
    logits_to_keep) → CausalLMOutputWithPast(loss, logits (B, S, V), cache); logits_to_keep n > 0: logits of the
    last min(n, S) positions only (generate() passes 1 because forward's signature has it); loss = next-token cross entropy over labels ≠ -100
    (the HyperMoE auxiliary losses are not in it: train with `hypermoe train` for those)."""

    config_class = HyperMoEHFConfig
    generation_config_class = HyperMoEGenerationConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _supports_cache_class = True  # transformers 4.x: generate() passes a DynamicCache (5.x always does)

    def __init__(self, config: HyperMoEHFConfig, *, transformer: HyperMoETransformer | None = None) -> None:
        with warnings.catch_warnings():  # 4.x derives a generation config from ours and warns at its top_k (experts)
            warnings.filterwarnings("ignore", message=r".*`top_k` is set to", category=UserWarning)
            super().__init__(config)
        cfg = config.to_hypermoe()
        if transformer is not None and transformer.config != cfg:
            raise ValueError("the HyperMoETransformer's config differs from the transformers config")
        self.model = transformer if transformer is not None else HyperMoETransformer(cfg)
        self.post_init()
        self.generation_config = HyperMoEGenerationConfig.from_model_config(config)  # 4.x made its own from config

    def _init_weights(self, module) -> None:
        """Nothing: HyperMoETransformer initialises its parameters itself (reset_parameters, ref.model's σ)."""

    def get_input_embeddings(self):
        return None  # token_embed is an (V, d) Parameter, not an nn.Embedding: resizing is not supported

    def get_output_embeddings(self):
        return None  # tied (token_embed.T) or an LMHead; nothing for transformers to tie

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | tuple | None = None,
                past_key_values: Cache | tuple | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast | tuple:
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("HyperMoEForCausalLM takes input_ids (inputs_embeds are not supported)")
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported by HyperMoEForCausalLM")
        kwargs.pop("cache_position", None)  # positions come from position_ids / attention_mask
        if kwargs:
            raise ValueError(f"unexpected argument(s) to HyperMoEForCausalLM.forward: {', '.join(sorted(kwargs))}")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache once, as cache (transformers 5) or past_key_values (4.x), not both")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if labels is not None and check_logits_to_keep(logits_to_keep) != 0:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0 with labels")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (B, P + S) 0/1, got shape {tuple(attention_mask.shape)}")
        B, S = input_ids.shape
        legacy = isinstance(cache, (tuple, list))
        if cache is None and use_cache:
            cache = new_cache(self.config)
        if legacy:  # 4.x: n_layers (key, value) pairs, the model's own past_key_values
            past, P = tuple(cache), cache[0][0].shape[2]
        else:
            P = 0 if cache is None else cache.get_seq_length()
            past = None if P == 0 else cached_pairs(cache)
        if position_ids is not None:
            position_ids = position_ids.expand(B, S)  # generate passes (1, S) without a mask
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past,
                         use_cache=cache is not None, logits_to_keep=logits_to_keep, aux=False)  # loss: no aux
        if legacy:
            cache = out.past_key_values
        elif cache is not None:
            for i, (key, value) in enumerate(out.past_key_values):  # each (B, H, P + S, c): the new S after P
                cache.update(key[:, :, P:], value[:, :, P:], i)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)  # position t predicts token t + 1
        if return_dict is False:
            return tuple(v for v in (loss, out.logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{CACHE_FIELD: cache})

    # --- folders: a hypermoe model directory is the pretrained folder ---

    def save_pretrained(self, save_directory: str | os.PathLike, *, safe_serialization: bool = True,
                        force: bool = False, **kwargs) -> None:
        """Write a hypermoe model directory (ref.io.save_dir: config.json with the token ids, weights.safetensors,
        or weights.npz with safe_serialization=False), atomically; an existing non-empty folder is refused unless
        `force` (which replaces only a model directory). HyperMoETransformer.from_dir reads it."""
        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False) and k not in
                             ("is_main_process", "push_to_hub", "max_shard_size"))
        if unsupported or kwargs.get("push_to_hub"):
            raise ValueError(f"save_pretrained: unsupported argument(s) {', '.join(unsupported or ['push_to_hub'])}")
        ref.io.save_dir(save_directory, self.config.to_hypermoe(), params_to_ref(self.model), "model",
                        force=force, format="safetensors" if safe_serialization else "npz",
                        token_ids=self.config.token_ids())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: HyperMoEHFConfig | None = None, dtype=None, torch_dtype=None, device_map=None,
                        subfolder: str = "", **kwargs) -> HyperMoEForCausalLM:
        """A model from a local hypermoe model directory (kind "model"), in eval mode. dtype: None or "auto" (the
        weights' own, float32 or float64), torch.float32/float64/bfloat16/float16 or their names; device_map: None,
        a device or its name. The folder's config.json is read by ref.io (strict: an unknown field is an error)."""
        extra = sorted(set(kwargs) - HUB_KWARGS)
        if model_args or extra:
            raise ValueError(f"HyperMoEForCausalLM.from_pretrained: unsupported argument(s) "
                             f"{', '.join(extra) or 'positional model_args'}")
        path = Path(pretrained_model_name_or_path) / subfolder
        if not (path / ref.io.CONFIG_FILE).is_file():
            raise ValueError(f"{path}: not a local hypermoe model directory (no {ref.io.CONFIG_FILE}); download a hub "
                             f"repository first (huggingface_hub.snapshot_download)")
        if (path / "genai_config.json").is_file():
            raise ValueError(f"{path}: an ONNX export folder (hypermoe generate or onnxruntime-genai run it), not a "
                             f"model directory")
        dtype = torch_dtype if dtype is None else dtype
        dtype = None if dtype in (None, "auto") else _DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be 'auto' or a torch floating dtype, got {dtype!r}")
        device = None if device_map in (None, "auto") else device_map
        if device is not None and not isinstance(device, (str, torch.device)):
            raise ValueError(f"device_map must be a device (one device holds the whole model), got {device_map!r}")
        _, _, fields = ref.io.read_config_fields(path)
        transformer = HyperMoETransformer.from_dir(path, device=device, dtype=dtype).eval()
        if config is None:
            config = HyperMoEHFConfig.from_hypermoe(transformer.config, **fields)
        elif config.to_hypermoe() != transformer.config:
            raise ValueError(f"the config passed differs from {path / ref.io.CONFIG_FILE}")
        config.name_or_path = str(pretrained_model_name_or_path)
        model = cls(config, transformer=transformer)
        return model.eval()


def new_cache(config: HyperMoEHFConfig) -> DynamicCache:
    """An empty DynamicCache for the model of `config` (what generate() makes)."""
    try:
        return DynamicCache(config=config)  # transformers 5: layers laid out from the config
    except TypeError:  # 4.x: DynamicCache() takes no config
        return DynamicCache()


def cached_pairs(cache: Cache) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """A Cache's keys and values as the model's past_key_values: one (key, value) per block, each (B, H, P, c)."""
    if hasattr(cache, "layers"):  # transformers 5: one CacheLayer per block
        return tuple((layer.keys, layer.values) for layer in cache.layers)
    return tuple(zip(cache.key_cache, cache.value_cache))  # 4.x's DynamicCache


AutoConfig.register(ref.io.MODEL_TYPE, HyperMoEHFConfig, exist_ok=True)
AutoModelForCausalLM.register(HyperMoEHFConfig, HyperMoEForCausalLM, exist_ok=True)
AutoTokenizer.register(HyperMoEHFConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)

__all__ = ["HyperMoEForCausalLM", "HyperMoEHFConfig", "cached_pairs", "new_cache"]
