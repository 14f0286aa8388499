"""Model configuration: fla's GatedDeltaNetConfig fields plus the `memory_caching` block.

`ModelConfig.from_dict` accepts a parsed `config.json`; every problem raises `ModelLoadError`
naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from mcserve.kernels.mc_spec import MCSpec, mc_problem
from mcserve.server.errors import ModelLoadError

ROUTERS = ("learned", "query")
GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")
CONFIG_FILE = "config.json"

# fla fields that only matter for training or that we accept and ignore
_IGNORED_FIELDS = {
    "architectures", "attn_mode", "max_position_embeddings", "use_cache", "initializer_range", "fuse_norm",
    "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy", "use_l2warp", "transformers_version",
    "torch_dtype", "dtype", "auto_map", "return_dict", "output_hidden_states", "output_attentions",
    "tie_encoder_decoder", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "pruned_heads", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "cross_attention_hidden_size", "_name_or_path",
    "output_scores", "return_dict_in_generate", "_attn_implementation_autoset", "name_or_path",
}


@dataclass(frozen=True, slots=True)
class MemoryCachingConfig:
    aggregation: str = "none"
    segment_size: int = 256
    top_k: int = 4
    state_init: str = "continue"
    router: str = "query"

    def __post_init__(self) -> None:
        def bad(fld: str, problem: str) -> ModelLoadError:
            return ModelLoadError(CONFIG_FILE, f"memory_caching.{fld}", problem)

        for name in ("aggregation", "segment_size", "top_k", "state_init"):
            problem = mc_problem(name, getattr(self, name))
            if problem is not None:
                raise bad(name, problem)
        if self.router not in ROUTERS:
            raise bad("router", f"must be one of {list(ROUTERS)}, got {self.router!r}")

    @classmethod
    def from_dict(cls, d: dict) -> MemoryCachingConfig:
        if not isinstance(d, dict):
            raise ModelLoadError(CONFIG_FILE, "memory_caching", f"must be an object, got {type(d).__name__}")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ModelLoadError(CONFIG_FILE, f"memory_caching.{sorted(unknown)[0]}",
                                 f"unknown option (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**d)

    def spec(self) -> MCSpec:
        return MCSpec(self.aggregation, self.segment_size, self.top_k, self.state_init)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_dim: int
    num_v_heads: int | None = None
    expand_v: float = 2.0
    conv_size: int = 4
    use_short_conv: bool = True
    conv_bias: bool = False
    use_gate: bool = True
    output_gate_activation: str = "swish"
    allow_neg_eigval: bool = False
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "gated_deltanet"
    max_position_embeddings: int | None = None
    memory_caching: MemoryCachingConfig = field(default_factory=MemoryCachingConfig)

    def __post_init__(self) -> None:
        def bad(fld: str, problem: str) -> ModelLoadError:
            return ModelLoadError(CONFIG_FILE, fld, problem)

        if self.model_type != "gated_deltanet":
            raise bad("model_type", f"must be 'gated_deltanet', got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "conv_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"must be a positive integer, got {v!r}")
        hv = self.num_v_heads_
        if hv < self.num_heads or hv % self.num_heads:
            raise bad("num_v_heads", f"must be a multiple of num_heads={self.num_heads}, got {hv}")
        dv = self.head_dim * self.expand_v
        if not math.isclose(dv, round(dv), rel_tol=1e-6) or round(dv) < 1:
            raise bad("expand_v", f"head_dim * expand_v must be an integer, got {self.head_dim} * {self.expand_v}")
        if self.hidden_act != "swish":
            raise bad("hidden_act", f"only 'swish' is supported, got {self.hidden_act!r}")
        if self.output_gate_activation not in GATE_ACTIVATIONS:
            raise bad("output_gate_activation", f"must be one of {list(GATE_ACTIVATIONS)}, "
                      f"got {self.output_gate_activation!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise bad("norm_eps", f"must be in (0, 1), got {self.norm_eps!r}")
        if self.intermediate_size is not None and (not isinstance(self.intermediate_size, int)
                                                   or self.intermediate_size < 1):
            raise bad("intermediate_size", f"must be a positive integer, got {self.intermediate_size!r}")

    @property
    def num_v_heads_(self) -> int:
        return self.num_v_heads if self.num_v_heads is not None else self.num_heads

    @property
    def head_v_dim(self) -> int:
        return round(self.head_dim * self.expand_v)

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads_ * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the q, k and v short convolutions together (the conv state's rows)."""
        return 2 * self.key_dim + self.value_dim

    @property
    def conv_width(self) -> int:
        """Inputs the conv state keeps per channel (W-1); 0 without short convolutions."""
        return self.conv_size - 1 if self.use_short_conv else 0

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        width = int(self.hidden_size * (self.hidden_ratio or 4) * 2 / 3)
        return 256 * ((width + 255) // 256)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (tuple(e) if isinstance(e, list) else (e,))

    @property
    def mc(self) -> MemoryCachingConfig:
        return self.memory_caching

    def state_bytes(self) -> int:
        """Bytes of one online-state slot (fp32 state + key sums) excluding the conv state."""
        return self.num_hidden_layers * (self.num_v_heads_ * self.head_v_dim * self.head_dim
                                         + self.num_heads * self.head_dim) * 4

    def checkpoint_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of one checkpoint block: the state in the checkpoint dtype + fp32 keys (conv excluded)."""
        return self.num_hidden_layers * (self.num_v_heads_ * self.head_v_dim * self.head_dim * dtype_bytes
                                         + self.num_heads * self.head_dim * 4)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ModelLoadError(CONFIG_FILE, None, f"must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("attn") is not None:
            raise ModelLoadError(CONFIG_FILE, "attn", "hybrid attention layers are not supported yet")
        if d.get("attnres_block_size") is not None:
            raise ModelLoadError(CONFIG_FILE, "attnres_block_size", "attention residuals are not supported")
        d.pop("attn", None)
        d.pop("attnres_block_size", None)
        mc = d.pop("memory_caching", None)
        known = set(cls.__dataclass_fields__) - {"memory_caching"}
        unknown = set(d) - known - _IGNORED_FIELDS
        if unknown:
            raise ModelLoadError(CONFIG_FILE, sorted(unknown)[0], "unknown option")
        for missing in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim"):
            if missing not in d:
                raise ModelLoadError(CONFIG_FILE, missing, "is required")
        kwargs = {k: v for k, v in d.items() if k in known}
        try:
            return cls(memory_caching=MemoryCachingConfig.from_dict(mc or {}), **kwargs)
        except TypeError as e:  # a field of the wrong kind (e.g. a list where a number belongs)
            raise ModelLoadError(CONFIG_FILE, None, str(e)) from e

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.memory_caching.aggregation == "none" and self.memory_caching == MemoryCachingConfig():
            d.pop("memory_caching")
        return d

    def with_mc(self, **overrides) -> ModelConfig:
        """A copy with memory-caching options overridden (e.g. from `--mc-aggregation`)."""
        from dataclasses import replace

        mc = replace(self.memory_caching, **{k: v for k, v in overrides.items() if v is not None})
        return replace(self, memory_caching=mc)
