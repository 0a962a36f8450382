"""Architecture knowledge as data: one table keyed by ``config.model_type``.

Paths are attribute paths relative to the model class sparsify loads (``AutoModelForCausalLM``
for decoders, ``AutoModel`` for encoders). Names inside a layer are relative to that layer.
Nothing else in sparsify spells out where a family keeps its layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from sparsify.errors import SparsifyError

SPARSIFY_TYPE_PREFIX = "sparsify_"  # checkpoints whose attention only sparsify runs (sparsify.runtime)
# The expert Linears of MoE blocks as sparsify holds them (one Linear per expert; Mixtral's and Qwen's names),
# relative to a layer: default targets in a MoE family (the routers are not among them: they stay in float)
EXPERT_LINEARS = r"(mlp|block_sparse_moe)\.(experts\.\d+|shared_expert)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class ConfigKeys:
    """Where a family's config keeps the sizes structured pruning changes, and its bias switches."""

    layers: str = "num_hidden_layers"
    ffn: str = "intermediate_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"  # None: one KV head per query head (MHA)
    head_dim: str | None = "head_dim"  # None: head_dim is hidden_size / heads, so heads cannot be removed
    mlp_bias: str | None = None  # output bias of the MLP: "native" (always there), a config flag, or None
    attn_bias: str | None = None  # output bias of attention, likewise


@dataclass(frozen=True)
class Arch:
    """Where one family keeps its parts."""

    layers: str  # the nn.ModuleList of decoder (or encoder) blocks
    embeddings: tuple[str, ...]  # token / position embeddings
    final_norm: str | None  # norm after the last block ("" when the family has none)
    attention: str  # attention block, relative to a layer
    mlp: str  # feed-forward block, relative to a layer (a MoE family: the sparse MoE block)
    attn_in: tuple[str, ...]  # Linears reading the attention input (q, k, v or a fused qkv)
    attn_out: str  # attention output projection
    mlp_in: tuple[str, ...]  # Linears reading the MLP input (gate, up, or fc1)
    mlp_out: str  # MLP output projection
    norms: tuple[str, ...]  # per-layer norms, relative to a layer
    ffn: str = "dense"  # "dense": mlp_in/mlp_out Linears; "experts": routed experts (EXPERT_LINEARS) and a router
    causal: bool = True  # decoder-only LM (False: bidirectional encoder)
    optional: tuple[str, ...] = ()  # modules a checkpoint may lack (not read by the layers; not written)
    # How the family's config expresses a sliding window natively (None: it cannot; sparsify.load runs it):
    # "mistral" (Llama-likes: model_type mistral, per-layer layer_types), "qwen" (use_sliding_window +
    # layer_types), "layer_types" (sliding_window + layer_types), "uniform" (one sliding_window for all layers)
    window_config: str | None = None
    # config fields keyed by layer type besides the window (Gemma 3's RoPE): rewriting layer_types moves them
    layer_type_settings: tuple[str, ...] = ()
    # layout of fused projections: attn_in "separate" (q, k, v) or "concat" ([q; k; v] rows, heads in order);
    # mlp_in "separate" (gate, up / fc1) or "concat" ([gate; up] rows)
    qkv_layout: str = "separate"
    gate_up_layout: str = "separate"
    keys: ConfigKeys = ConfigKeys()
    # norm (relative to a layer) -> the Linears it feeds (SmoothQuant folds scales into it)
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Linear (relative to a layer) -> the Linears whose inputs are its outputs channel for channel (AWQ folds scales
    # into its rows): v_proj -> o_proj (skipped where grouped KV heads repeat v's outputs), up_proj -> down_proj
    linear_feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    norm_offset: float = 0.0  # the norm scales by offset + weight (Gemma's RMSNorm: 1 + w)
    # whether a norm's output goes only to the Linears it feeds (pre-norm); post-norm blocks (BERT) also
    # send it down the residual stream, so scaling the norm would change the model
    smoothable: bool = True
    # the native MoE families a dense FFN of this family converts into: (routed experts only, with shared
    # experts); None where transformers has no MoE counterpart that keeps the rest of the layer
    moe_families: tuple[str | None, str | None] = (None, None)
    # the model_type transformers' AutoConfig builds when this family's config.json has per-layer layer_types
    # (a Mistral config with layer_types is a Ministral one); None: the family's own
    with_layer_types: str | None = None
    notes: str = ""
    model_type: str = field(default="", compare=False)

    @property
    def stages(self) -> list[tuple[str, ...]]:
        """Target Linears (relative to a layer) in data-flow order: attention in, attention out, MLP in, MLP out."""
        attn = [tuple(f"{self.attention}.{n}" for n in group) for group in (self.attn_in, (self.attn_out,))]
        if self.ffn != "dense":  # experts: a last stage of their own (names not in a stage go last)
            return attn
        mlp = [tuple(f"{self.mlp}.{n}" if self.mlp else n for n in group) for group in (self.mlp_in, (self.mlp_out,))]
        return attn + mlp

    @property
    def targets(self) -> tuple[str, ...]:
        """Default target Linears, relative to a layer (a MoE family's experts: :data:`EXPERT_LINEARS` besides)."""
        return tuple(name for stage in self.stages for name in stage)


_LLAMA_LIKE = Arch(
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    attention="self_attn",
    mlp="mlp",
    attn_in=("q_proj", "k_proj", "v_proj"),
    attn_out="o_proj",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    linear_feeds=(("self_attn.v_proj", ("self_attn.o_proj",)), ("mlp.up_proj", ("mlp.down_proj",))),
)
_GEMMA2_LIKE = replace(
    _LLAMA_LIKE,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    norm_feeds=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    keys=ConfigKeys(attn_bias="attention_bias"),
)

# The MoE families sparsify writes (dense -> MoE) and reads back: Llama-like attention, a sparse MoE block at
# `mlp` with a router `mlp.gate` and one Linear per expert (sparsify.runtime.moe.MoEBlock); the post-attention
# norm feeds the router and every expert, so SmoothQuant folds only into q/k/v
_MOE_LIKE = replace(
    _LLAMA_LIKE,
    ffn="experts",
    mlp_in=(),
    mlp_out="",
    norm_feeds=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),),
    linear_feeds=(("self_attn.v_proj", ("self_attn.o_proj",)),),
    notes="sparse MoE: experts one Linear each, the router kept in float",
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": replace(  # same weights and names as Mistral
        _LLAMA_LIKE,
        window_config="mistral",
        keys=ConfigKeys(mlp_bias="mlp_bias", attn_bias="attention_bias"),
        moe_families=("mixtral", "qwen2_moe"),
    ),
    "mistral": replace(
        _LLAMA_LIKE, window_config="mistral", moe_families=("mixtral", "qwen2_moe"), with_layer_types="ministral"
    ),
    "qwen2": replace(_LLAMA_LIKE, window_config="qwen", moe_families=("qwen2_moe", "qwen2_moe")),
    "qwen3": replace(
        _LLAMA_LIKE, window_config="qwen", keys=ConfigKeys(attn_bias="attention_bias"), moe_families=("qwen3_moe", None)
    ),
    "mixtral": replace(_MOE_LIKE, window_config="uniform"),
    "qwen2_moe": replace(_MOE_LIKE, window_config="qwen"),
    "qwen3_moe": replace(_MOE_LIKE, window_config="uniform", keys=ConfigKeys(attn_bias="attention_bias")),
    "gemma": replace(_LLAMA_LIKE, keys=ConfigKeys(attn_bias="attention_bias"), norm_offset=1.0),
    "gemma2": replace(_GEMMA2_LIKE, window_config="layer_types", norm_offset=1.0),
    "gemma3_text": replace(
        _GEMMA2_LIKE, window_config="layer_types", layer_type_settings=("rope_parameters",), norm_offset=1.0
    ),
    "phi3": Arch(
        layers="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        attention="self_attn",
        mlp="mlp",
        attn_in=("qkv_proj",),
        attn_out="o_proj",
        mlp_in=("gate_up_proj",),
        mlp_out="down_proj",
        norms=("input_layernorm", "post_attention_layernorm"),
        window_config="uniform",
        qkv_layout="concat",
        gate_up_layout="concat",
        norm_feeds=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        notes="q/k/v and gate/up are fused Linears",
    ),
    "gpt2": Arch(
        layers="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        attention="attn",
        mlp="mlp",
        attn_in=("c_attn",),
        attn_out="c_proj",
        mlp_in=("c_fc",),
        mlp_out="c_proj",
        norms=("ln_1", "ln_2"),
        qkv_layout="concat",
        keys=ConfigKeys(
            layers="n_layer",
            ffn="n_inner",
            heads="n_head",
            kv_heads=None,
            head_dim=None,
            mlp_bias="native",
            attn_bias="native",
        ),
        norm_feeds=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        notes="Conv1D layers store weights as (in, out); q/k/v are one fused c_attn",
    ),
    "opt": Arch(
        layers="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        attention="self_attn",
        mlp="",
        attn_in=("q_proj", "k_proj", "v_proj"),
        attn_out="out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        norms=("self_attn_layer_norm", "final_layer_norm"),
        keys=ConfigKeys(ffn="ffn_dim", kv_heads=None, head_dim=None, mlp_bias="native", attn_bias="native"),
        norm_feeds=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        attention="attention",
        mlp="mlp",
        attn_in=("query_key_value",),
        attn_out="dense",
        mlp_in=("dense_h_to_4h",),
        mlp_out="dense_4h_to_h",
        norms=("input_layernorm", "post_attention_layernorm"),
        qkv_layout="interleaved",
        keys=ConfigKeys(kv_heads=None, head_dim=None, mlp_bias="native", attn_bias="native"),
        norm_feeds=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
    ),
    "bert": Arch(
        layers="encoder.layer",
        embeddings=(
            "embeddings.word_embeddings",
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
        ),
        final_norm=None,
        attention="attention",
        mlp="",
        attn_in=("self.query", "self.key", "self.value"),
        attn_out="output.dense",
        mlp_in=("intermediate.dense",),
        mlp_out="output.dense",
        norms=("attention.output.LayerNorm", "output.LayerNorm"),
        causal=False,
        keys=ConfigKeys(kv_heads=None, head_dim=None, mlp_bias="native", attn_bias="native"),
        norm_feeds=(("attention.output.LayerNorm", ("intermediate.dense",)),),  # q/k/v: the previous layer's norm
        smoothable=False,  # post-norm: the LayerNorm's output is also the residual stream
        optional=("pooler",),  # MLM and sentence-embedding checkpoints have no pooler
        notes="encoder: bidirectional attention, loaded with AutoModel",
    ),
}


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp runs one family: what ``convert_hf_to_gguf.py`` writes for it and what llama.cpp assumes.

    Tensor names come from gguf's own ``TensorNameMap`` for ``name``; per-expert Linears are stacked into its
    ``*_exps`` tensors (the name without the expert index). Norm weights are written as ``norm_offset + w``
    (:attr:`Arch.norm_offset`), as llama.cpp multiplies by the stored weight alone.
    """

    name: str  # gguf's MODEL_ARCH name (general.architecture)
    permute_qk: bool = False  # q/k rows reordered per head for llama.cpp's rotary pairs (Llama's converter)
    # "none": llama.cpp runs no sliding window for this family; "every-N": the window on every layer but each
    # N-th (Gemma 2: 2, Gemma 3: 6), a pattern fixed in llama.cpp
    windows: str = "none"
    rope_freqs: bool = False  # reads a ``rope_freqs`` tensor of per-frequency divisors (Llama 3's RoPE scaling)
    softcapping: bool = False  # attention and final logit soft-capping (Gemma 2)
    # Gemma's query_pre_attn_scalar, which llama.cpp does not read: it scales queries by 1/sqrt(head_dim), or at
    # this many layers (the 27B models) by 1/sqrt(hidden / heads); 0: the family has no such setting
    query_scale_layers: int = 0
    output_required: bool = False  # llama.cpp needs ``output.weight`` even where the embeddings are tied
    # config facts llama.cpp does not read but assumes: (dotted config path, the value it must have)
    assumes: tuple[tuple[str, object], ...] = ()


_GGUF_LLAMA = GgufArch("llama", permute_qk=True, rope_freqs=True)
_ALL_MOE = (("decoder_sparse_step", 1), ("mlp_only_layers", []))  # Qwen MoE configs: every layer a MoE layer
GGUF_ARCHITECTURES: dict[str, GgufArch] = {  # model_type -> llama.cpp's family; any other is refused
    "llama": _GGUF_LLAMA,
    "mistral": _GGUF_LLAMA,  # llama.cpp runs Mistral as Llama (no sliding window)
    "mixtral": _GGUF_LLAMA,  # Llama with stacked experts
    "qwen2": GgufArch("qwen2"),
    # llama.cpp's Qwen MoE routing: Qwen2-MoE never renormalises the top-k weights, Qwen3-MoE always does; and
    # every layer is a MoE layer there
    "qwen2_moe": GgufArch("qwen2moe", output_required=True, assumes=(("norm_topk_prob", False), *_ALL_MOE)),
    "qwen3": GgufArch("qwen3"),
    "qwen3_moe": GgufArch("qwen3moe", assumes=(("norm_topk_prob", True), *_ALL_MOE)),
    "gemma": GgufArch("gemma"),
    "gemma2": GgufArch("gemma2", windows="every-2", softcapping=True, query_scale_layers=46),
    # Gemma 3 in llama.cpp: local layers with RoPE base 10000, whatever the config says, and no soft-capping
    "gemma3_text": GgufArch(
        "gemma3",
        windows="every-6",
        query_scale_layers=62,
        assumes=(
            ("rope_parameters.sliding_attention.rope_theta", 10000.0),
            ("attn_logit_softcapping", None),
            ("final_logit_softcapping", None),
        ),
    ),
    "phi3": GgufArch("phi3"),  # llama.cpp reads Phi-3's sliding_window but runs full attention (disabled there)
}


def lookup(model_type: str) -> Arch | None:
    """The table entry for ``model_type`` (a sparsify-attention checkpoint's: its family's), or None."""
    model_type = model_type.removeprefix(SPARSIFY_TYPE_PREFIX)
    arch = ARCHITECTURES.get(model_type)
    return None if arch is None else replace(arch, model_type=model_type)


def layer_windows(config) -> list[int | None]:
    """Each layer's attention window as transformers runs ``config`` (None: full attention), whichever way the
    family writes it (one ``sliding_window``, ``use_sliding_window``, per-layer ``layer_types``). A window as
    long as the context changes nothing and reads as None."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    if not window or getattr(config, "use_sliding_window", True) is False or (positions and window >= positions):
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types:
        return [int(window) if t == "sliding_attention" else None for t in types]
    return [int(window)] * n


def is_encoder(model_type: str) -> bool:
    arch = lookup(model_type)
    return arch is not None and not arch.causal


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def find_layers(model: nn.Module, arch: Arch | None) -> tuple[str, nn.ModuleList]:
    """The blocks the layer-wise loop walks: from the table, or the largest ModuleList when unknown."""
    if arch is not None:
        layers = get_submodule(model, arch.layers)
        if not isinstance(layers, nn.ModuleList):
            raise SparsifyError(f"{arch.layers} is not a list of layers in this {arch.model_type} model")
        return arch.layers, layers
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise SparsifyError("found no list of layers in this model")
    return best[1], best[2]


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))
