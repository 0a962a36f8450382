"""The plan of a GGUF export: every tensor's GGUF name, shape, transform and type, and every check, before a byte
is written (:func:`plan`; the writing is :mod:`.gguf`).

- Names from gguf's ``TensorNameMap``; per-expert Linears stacked into ``ffn_{gate,up,down}_exps``
  ``(experts, out, in)``; Llama-family q/k rows permuted for llama.cpp's rotary pairs; norms written as
  ``offset + w`` (Gemma's ``1 + w``).
- Types (:func:`_choose`): 1-D tensors and routers in F32; int4 symmetric in groups of 32 → Q4_0, int4
  asymmetric in groups of 32 → Q4_1, int8 symmetric in groups of 32 → Q8_0, as stored (scales to fp16, a
  note when one changes); other quantized layouts rounded again to the nearest block type, with a note;
  float matrices in ``--type`` (a named mix: each matrix in the type :mod:`.mixes` gives it; q4_0, q5_0, iq4_nl,
  iq4_xs: the few matrices llama-quantize's rules for them give more bits, ``mixes.TYPE_RULES``), with
  llama-quantize's fallback where rows are not whole blocks.
- Refusals: an architecture, a configuration or a quantization llama.cpp would run differently.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsify.algorithms.iq4 import IQ4_TYPES
from sparsify.algorithms.kquants import KTYPES, QK_K
from sparsify.arch import GGUF_ARCHITECTURES, SPARSIFY_TYPE_PREFIX, GgufArch, layer_windows, lookup
from sparsify.errors import SparsifyError
from sparsify.export import GgufConfig, mixes
from sparsify.export import ggml_blocks as blocks
from sparsify.export.gguf_vocab import Vocab, read_vocab
from sparsify.export.gguf_weights import Layout, Stored, read_layout

_EXPERT = re.compile(r"^(?P<base>.+\.experts)\.(?P<index>\d+)\.(?P<linear>[^.]+)$")  # one Linear per expert
_QUANT_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale")
_KEEP_F32 = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # routers stay in F32, as llama.cpp's converter keeps them
_ONE_ROW = ("ffn_gate_inp_shexp",)  # a (1, hidden) Linear that llama.cpp reads as a vector
# the embeddings and the output head of a K or IQ4 --type take Q6_K; a legacy --type's output head (and a tied
# embedding, which is also the output head) as llama-quantize gives it (_legacy_head)
_WIDE = ("token_embd", "output")
_ROPE_TYPES = (None, "default", "linear")
# what llama-quantize writes for a K type (or IQ4_XS) where a tensor's rows are not whole super-blocks of 256
# (llama-quant.cpp's tensor_type_fallback, llama.cpp 11434); IQ4_NL's blocks are 32 weights: it stays IQ4_NL
K_FALLBACK = {"q2_k": "Q4_0", "q3_k": "Q4_0", "q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0", "iq4_xs": "IQ4_NL",
              "iq4_nl": "IQ4_NL"}  # fmt: skip


# --------------------------------------------------------------------------------------------------- the plan


@dataclass
class Planned:
    """One GGUF tensor: where it comes from, what is done to it, and the type it is written in."""

    name: str  # GGUF name (blk.0.attn_q.weight)
    sources: list[str]  # checkpoint names: one, or one per expert ("...experts.3.w1.weight")
    shape: tuple[int, ...]  # (experts,) rows, cols as PyTorch holds it
    qtype: Any  # gguf.GGMLQuantizationType
    how: str  # "as stored", "float", "quantized", "requantized", "dequantized"
    permute_heads: int = 0  # q/k rows permuted for this many heads (0: not)
    offset: float = 0.0  # added to the weight (norms: Gemma's 1 + w)
    reshape: tuple[int, ...] | None = None
    values: Tensor | None = None  # computed, not read (rope_freqs)
    importance: Tensor | None = None  # (in,) the K-quant's per-column weights (None: unweighted)


@dataclass
class Plan:
    path: Path
    arch: GgufArch
    config: Any
    tensors: list[Planned]
    vocab: Vocab
    notes: list[str] = field(default_factory=list)
    layouts: dict[str, Layout] = field(default_factory=dict)  # the quantized checkpoint weights
    budget: dict[str, Any] | None = None  # --target-size/--target-bpw's allocation (:mod:`.budget`)
    file_type: str | None = None  # a named mix's or IQ4 type's gguf.LlamaFileType member (else the most common type's)


def _entries(source, cfg: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], Layout | None]]:
    """Checkpoint weight name -> (shape, layout if quantized): a compressed-tensors Linear is one ``<fqn>.weight``."""
    keys = set(source.keys())
    out: dict[str, tuple[tuple[int, ...], Layout | None]] = {}
    for key in sorted(keys):
        module, _, leaf = key.rpartition(".")
        if leaf in _QUANT_SUFFIXES:
            continue
        if leaf == "weight_packed" or (leaf == "weight" and f"{module}.weight_scale" in keys):
            out[f"{module}.weight"] = read_layout(source, module, keys)
        else:
            out[key] = (tuple(source.info(key).shape), None)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in out:
        del out["lm_head.weight"]
    return out


def plan(model_dir, out: Path, config: GgufConfig) -> Plan:
    """Every check and every tensor's name, shape and type, before anything is written."""
    cfg = model_dir.load_config()
    fam, norm_offset = _family(cfg.model_type)
    _check_config(cfg, fam)
    notes = _check_quantization(cfg)
    vocab = read_vocab(model_dir.path, int(cfg.vocab_size))
    entries = _entries(model_dir.source, cfg.to_dict())
    tensors = _named(entries, fam, int(cfg.num_hidden_layers))
    if rope_parameters(cfg).get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = _llama3_rope_freqs(cfg)
    if fam.output_required and "output.weight" not in tensors:
        tensors["output.weight"] = replace(tensors["token_embd.weight"], name="output.weight")
    layouts = {k: layout for k, (_, layout) in entries.items() if layout is not None}
    mix = mixes.MIXES.get(config.tensor_type)
    if mix is not None and any(len(t.sources) > 1 for t in tensors.values()):
        raise SparsifyError(
            f"--type {config.tensor_type}: llama-quantize's named mixes are followed for dense models, and this one"
            f" has experts; give a K type (--type {mix.base}) or a size (--target-size)"
        )
    tied = "output.weight" not in tensors
    weighted = config.importance != "none" and not layouts  # blocks fitted to an importance: llama-quantize's imatrix
    layers, gqa = int(cfg.num_hidden_layers), _gqa(cfg)
    for t in tensors.values():
        _shape_and_transform(t, cfg, fam, norm_offset)
        parts = [layouts[s] for s in t.sources if s in layouts]
        want = config.tensor_type
        if mix is not None and len(t.shape) > 1:  # the type llama-quantize gives this matrix in the named mix
            want = mixes.tensor_type(want, t.name, layers, tied, gqa, weighted)
        elif len(t.shape) > 1:  # q4_0, q5_0, iq4_nl, iq4_xs: llama-quantize's rules for them (mixes.TYPE_RULES)
            want = mixes.type_of(want, t.name, layers, gqa, weighted)
        dtype = _float_dtype(model_dir, t)
        t.qtype, t.how = _choose(t, parts, len(parts) == len(t.sources), want, dtype, wide=mix is None, tied=tied)
    notes += vocab.notes + _type_notes(list(tensors.values()), layouts, config.tensor_type)
    file_type = mix.file_type if mix is not None else None
    if config.tensor_type in IQ4_TYPES:  # llama-quantize writes the file type asked for, whatever the fallbacks
        file_type = f"MOSTLY_{config.tensor_type.upper()}"
    return Plan(out, fam, cfg, list(tensors.values()), vocab, notes, layouts, file_type=file_type)


def kv_heads(cfg) -> int:
    """The key/value heads the file states (``head_count_kv``): the config's, or one per attention head."""
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def _gqa(cfg) -> int:
    """llama.cpp's ``n_gqa()`` of the file written: attention heads per key/value head, in integers."""
    return int(cfg.num_attention_heads) // kv_heads(cfg)


def _family(model_type: str) -> tuple[GgufArch, float]:
    """llama.cpp's facts for ``model_type`` and its norm offset; refused if llama.cpp cannot run it."""
    if model_type.startswith(SPARSIFY_TYPE_PREFIX):
        raise SparsifyError(
            "this output's attention patterns (sinks, block-sparse, local windows) run only in sparsify's runtime"
            " (sparsify.load); llama.cpp cannot run them: export the model before the attention pass"
        )
    fam, arch = GGUF_ARCHITECTURES.get(model_type), lookup(model_type)
    if fam is None or arch is None:
        raise SparsifyError(
            f"llama.cpp has no architecture sparsify exports for {model_type!r}; GGUF export covers"
            f" {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return fam, arch.norm_offset


def _named(entries: dict, fam: GgufArch, layers: int) -> dict[str, Planned]:
    """GGUF name -> planned tensor, named by gguf's TensorNameMap; experts grouped under their stacked name."""
    import gguf

    names = gguf.get_tensor_name_map(_model_arch(fam.name), layers)
    tensors: dict[str, Planned] = {}
    for key, (shape, _) in entries.items():
        module, _, leaf = key.rpartition(".")
        expert = _EXPERT.match(module)
        target = names.get_name(f"{expert['base']}.{expert['linear']}" if expert else module)
        if target is None:
            raise SparsifyError(f"{key} has no name in llama.cpp's {fam.name} architecture; not exported")
        name = f"{target}.{leaf}"
        if name in tensors:  # another expert of a stacked tensor
            tensors[name].sources.append(key)
        else:
            tensors[name] = Planned(name, [key], shape, None, "")
    return tensors


def _llama3_rope_freqs(cfg) -> Planned:
    """Llama 3's RoPE scaling as llama.cpp runs it: each frequency divided by a factor (``rope_freqs``), 1 for
    short wavelengths, ``factor`` for long ones, smoothly between (transformers' ``_compute_llama3_parameters``)."""
    rope = rope_parameters(cfg)
    dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    base, factor = float(rope.get("rope_theta", 10000.0)), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim / 2,)
    wavelen = 2 * torch.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    divisor = 1 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelen < context / high, 1.0, torch.where(wavelen > context / low, factor, divisor))
    values = divisor.to(torch.float32)
    return Planned("rope_freqs.weight", [], tuple(values.shape), None, "", values=values)


def _model_arch(name: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _shape_and_transform(t: Planned, cfg, fam: GgufArch, norm_offset: float) -> None:
    """Stacked experts' shape, the q/k permutation, the norm offset and 1-row reshape of one tensor."""
    if len(t.sources) > 1:
        t.sources.sort(key=lambda s: int(_EXPERT.match(s.rpartition(".")[0])["index"]))  # type: ignore[index]
        t.shape = (len(t.sources), *t.shape)
    kind = t.name.split(".")[-2]
    if fam.permute_qk and kind in ("attn_q", "attn_k"):
        t.permute_heads = int(cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads)
    if kind.endswith("norm") and t.name.endswith(".weight"):
        t.offset = norm_offset
    if kind in _ONE_ROW and len(t.shape) == 2 and t.shape[0] == 1:
        t.reshape = (t.shape[1],)
        t.shape = t.reshape


def _float_dtype(model_dir, t: Planned) -> torch.dtype:
    key = t.sources[0] if t.sources else ""
    return model_dir.source.info(key).dtype if key in model_dir.source else torch.float32


def _choose(
    t: Planned,
    parts: list[Layout],
    quantized: bool,
    want: str,
    dtype: torch.dtype,
    wide: bool = True,
    tied: bool = False,
) -> tuple[Any, str]:
    """``(GGUF type, how)`` for one tensor; see the module docstring. ``parts``: the layouts of its quantized
    sources (one, or one per expert; ``quantized``: all of them are); ``wide``: the embeddings and output head of a
    K or IQ4 ``want`` take Q6_K (a named mix has given them their type already); ``tied``: the token embedding is
    also the output head."""
    from gguf import GGMLQuantizationType as Q

    floats = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
    quants = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}
    kind = t.name.split(".")[-2]
    if len(t.shape) == 1 or kind in _KEEP_F32:
        return Q.F32, "dequantized" if parts else "float"
    if want in KTYPES or want in IQ4_TYPES:
        return _choose_k(t, want, bool(parts), wide)
    fits = t.shape[-1] % blocks.BLOCK == 0
    if parts:
        stored = parts[0].gguf_type() if quantized and len(set(parts)) == 1 else None
        if want in floats:
            return floats[want], "dequantized"
        if stored is not None and (want == "auto" or quants.get(want) == stored):
            return stored, "as stored"
        if not fits:
            return Q.F16, "dequantized"
        if want in quants:
            return quants[want], "requantized"
        p = parts[0]
        return (Q.Q8_0 if p.bits > 4 else Q.Q4_0 if p.symmetric else Q.Q4_1), "requantized"
    if want in floats:
        return floats[want], "float"
    if want in quants and fits:
        return Q[_legacy_head(kind, want, t.shape[-1], tied).upper()], "quantized"
    if want in quants:
        return Q.F16, "float"
    return (Q.BF16 if dtype == torch.bfloat16 else Q.F16), "float"


def _legacy_head(kind: str, want: str, cols: int, tied: bool) -> str:
    """The type llama-quantize gives a float matrix of kind ``kind`` in a ``want`` (Q4_0..Q5_1, Q8_0) file: the
    output head, and a token embedding tied to it, in Q6_K where its rows are whole super-blocks of 256, else in
    Q8_0; every other matrix (an untied embedding too) and every matrix of a Q8_0 file in ``want``."""
    if want == "q8_0" or not (kind == "output" or (tied and kind == "token_embd")):
        return want
    return "q6_k" if cols % QK_K == 0 else "q8_0"


def _choose_k(t: Planned, want: str, quantized: bool, wide: bool = True) -> tuple[Any, str]:
    """A K-quant (or IQ4) ``want`` for one matrix: in that type where its rows are whole super-blocks of 256, else
    in llama-quantize's fallback for it (Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL; F16 where rows are not whole blocks of 32
    either); the embeddings and output head of a 2- to 5-bit file in Q6_K (Q8_0 as fallback), as llama-quantize gives
    the output head (and a tied embedding)."""
    from gguf import GGMLQuantizationType as Q

    how = "requantized" if quantized else "quantized"
    name = "q6_k" if wide and t.name.split(".")[-2] in _WIDE else want
    if t.shape[-1] % QK_K == 0:
        return Q[name.upper()], how
    if t.shape[-1] % blocks.BLOCK == 0:
        return Q[K_FALLBACK[name]], how
    return Q.F16, "dequantized" if quantized else "float"


def _type_notes(tensors: list[Planned], layouts: dict[str, Layout], want: str) -> list[str]:
    """What the user should know about the types chosen: rounding again, dequantizing, fallbacks."""
    from gguf import GGMLQuantizationType as Q

    notes = []
    again = [t for t in tensors if t.how == "requantized"]
    if again:
        kinds = sorted({layouts[s].describe(t.shape[-1]) for t in again for s in t.sources if s in layouts})
        types = sorted({t.qtype.name for t in again})
        why = (
            f"--type {want} asks for another type"
            if want != "auto"
            else "GGUF's block types hold blocks of 32 weights (Q4_0 and Q8_0 symmetric, Q4_1 with a minimum)"
        )
        int4 = want == "auto" and any(layouts[s].bits == 4 for t in again for s in t.sources if s in layouts)
        hint = " (sparsify quantize --group-size 32: int4 weights then export as stored)" if int4 else ""
        notes.append(
            f"{len(again)} quantized tensors rounded again ({'; '.join(kinds)} to {', '.join(types)}): {why};"
            f" their rounding errors add up{hint}"
        )
    deq = [t for t in tensors if t.how == "dequantized" and len(t.shape) > 1 and t.name.split(".")[-2] not in _KEEP_F32]
    if deq:
        types = ", ".join(sorted({t.qtype.name for t in deq}))
        notes.append(f"{len(deq)} quantized tensors written dequantized ({types})")
    fallback = [t for t in tensors if t.how in ("float", "dequantized") and t.qtype == Q.F16 and t.shape[-1] % 32]
    if fallback:
        notes.append(f"{len(fallback)} tensors in F16: rows of {fallback[0].shape[-1]} are not whole blocks of 32")
    short = [t for t in tensors if len(t.shape) > 1 and t.shape[-1] % QK_K and t.qtype not in (Q.F32, Q.F16)]
    short = [t for t in short if t.qtype.name.lower() != want]  # IQ4_NL's blocks are 32 weights
    if (want in KTYPES or want in IQ4_TYPES or want in mixes.MIXES) and short:
        types = ", ".join(f"{n} {q}" for q, n in sorted(Counter(t.qtype.name for t in short).items()))
        widths = ", ".join(str(w) for w in sorted({t.shape[-1] for t in short}))
        notes.append(
            f"{len(short)} tensors not in {want.upper()} ({types}, llama-quantize's fallback): rows of {widths} are"
            f" not whole super-blocks of {QK_K}"
        )
    return notes


class ScaleChanges:
    """Counts, as tensors are written as stored, the scales (and Q4_1 minimums) that fp16 does not hold."""

    def __init__(self) -> None:
        self.scales = self.changed = self.minimums = 0
        self.worst = 0.0

    def add(self, w: Stored) -> None:
        self.scales += w.scale.numel()  # type: ignore[union-attr]
        n, rel = blocks.fp16_changes(w.scale)  # type: ignore[arg-type]
        self.changed, self.worst = self.changed + n, max(self.worst, rel)
        if w.zero_point is not None:
            n, rel = blocks.fp16_changes(blocks.q4_1_min(w.scale, w.zero_point))  # type: ignore[arg-type]
            self.minimums, self.worst = self.minimums + n, max(self.worst, rel)

    def note(self) -> str | None:
        if not (self.changed or self.minimums):
            return None
        what = [f"{self.changed} of {self.scales} scales"] if self.changed else []
        what += [f"{self.minimums} Q4_1 block minimums (-(8 + zero point) * scale)"] if self.minimums else []
        return (
            f"{' and '.join(what)} are not exactly fp16, GGUF's block scale type:"
            f" rounded to fp16 (largest relative change {self.worst:.1e}); the integer weights are as stored"
            + ("" if self.minimums and not self.changed else " (a float16 checkpoint quantizes to fp16 scales)")
        )


def _check_config(cfg, fam: GgufArch) -> None:
    """Refuse what llama.cpp would run differently from transformers: windows, RoPE scaling, fixed settings."""
    rope = rope_parameters(cfg)
    kinds = _ROPE_TYPES + (("llama3",) if fam.rope_freqs else ())
    if rope.get("rope_type") not in kinds:
        raise SparsifyError(
            f"RoPE scaling {rope.get('rope_type')!r} is not exported to GGUF for {fam.name} yet (supported:"
            f" {', '.join(str(k) for k in kinds[1:])})"
        )
    for path, want in fam.assumes:
        got = _config_value(cfg, path)
        if got is not None and got != want:
            raise SparsifyError(
                f"{path} is {got} but llama.cpp's {fam.name} assumes {want}: it would compute another model"
            )
    if fam.query_scale_layers:
        _check_query_scale(cfg, fam)
    windows = layer_windows(cfg)
    if any(windows) and _expressible(cfg, fam, windows) is False:
        shown = ", ".join("full" if w is None else str(w) for w in windows)
        raise SparsifyError(
            f"llama.cpp's {fam.name} cannot run these attention windows per layer ({shown}):"
            f" {'it runs no sliding window' if fam.windows == 'none' else 'its pattern is ' + fam.windows}"
        )


def _check_query_scale(cfg, fam: GgufArch) -> None:
    """Gemma's query scaling as llama.cpp fixes it: 1/sqrt(head_dim), or 1/sqrt(hidden / heads) at the 27B depth."""
    heads, layers = int(cfg.num_attention_heads), int(cfg.num_hidden_layers)
    wide = layers == fam.query_scale_layers
    want = cfg.hidden_size // heads if wide else int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    got = getattr(cfg, "query_pre_attn_scalar", None)
    if got is not None and got != want:
        rule = f"hidden_size / heads at {layers} layers" if wide else f"head_dim at {layers} layers"
        raise SparsifyError(
            f"query_pre_attn_scalar is {got} but llama.cpp's {fam.name} scales queries by {rule} ({want}): it would"
            " compute another model"
        )


def _expressible(cfg, fam: GgufArch, windows: list[int | None]) -> bool:
    if fam.windows.startswith("every-"):
        n = int(fam.windows.removeprefix("every-"))
        window = int(cfg.sliding_window)
        return windows == [window if i % n < n - 1 else None for i in range(len(windows))]
    return False


def rope_parameters(cfg) -> dict[str, Any]:
    """The RoPE parameters of full-attention layers (Gemma 3 keeps one set per layer type)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    return dict(rope.get("full_attention", rope))


def _config_value(cfg, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _check_quantization(cfg) -> list[str]:
    from sparsify.checkpoint.compressed_tensors import is_compressed_tensors, quantization_dict, read_schemes

    if not is_compressed_tensors(cfg):
        if getattr(cfg, "quantization_config", None):
            raise SparsifyError("this checkpoint's quantization is not compressed-tensors; GGUF export reads that")
        return []
    groups, _, reason = read_schemes(quantization_dict(cfg) or {})
    if reason is not None:
        raise SparsifyError(f"this compressed-tensors checkpoint cannot be exported: {reason}")
    if any(g.scheme is not None and g.scheme.activations for g in groups):
        return ["int8 activation quantization (W8A8) is not carried over: llama.cpp quantizes activations itself"]
    return []
