"""Our GGUF blocks beside `llama-quantize`'s, tensor by tensor, on the same float16 weights.

    B=/path/to/llama.cpp/build/bin python benchmarks/bench_llamacpp_blocks.py [--types q4_0 q4_k ...]

A seeded Llama whose every matrix has rows of whole 256-weight super-blocks (hidden 256, MLP 512, 4 layers,
transformers' initialisation, weights in float16 so both tools start from the same values) is exported by
sparsify as F16; `llama-quantize --pure` quantizes that file to each type, and `sparsify export gguf --type T`
writes the same folder. For every matrix held in the same type by both files:

- **without an importance** (`llama-quantize` with no imatrix, `--importance none`): how many blocks are byte for
  byte the same, and the root mean square error of each file's weights to the float16 ones;
- **with the same importance**: `llama-imatrix` over 32 x 256 tokens of the embedded pydoc text on the F16 file,
  `llama-quantize --imatrix` beside sparsify's quantizers given that very imatrix (its `in_sum2 / counts`); the
  error each minimises, `sum_j imp_j (w_ij - q_ij)^2`, compared.

Results print as a table and append to bench-out/llamacpp-blocks.jsonl.

    B=... python benchmarks/bench_llamacpp_blocks.py --model FOLDER [--mixes q4_k_m q3_k_m ...]

compares whole files instead: the model rounded to float16 (so both tools start from the same values), exported
F16, `llama-quantize` (no `--pure`, no imatrix) at each named type beside `sparsify export gguf --type T
--importance none`; for every tensor, whether it has the same type and the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import OUT
from sparsify.devices import cpu_flags

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
SIZES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip


def folder(root: Path) -> Path:
    """The seeded Llama in float16, with the zoo's tokenizer."""
    import transformers as T

    from tests import zoo

    out = root / "llama-f16"
    if not (out / "config.json").exists():
        config = T.LlamaConfig(**{**zoo._COMMON, **SIZES}, **zoo._IDS)
        torch.manual_seed(0)
        T.LlamaForCausalLM(config).eval().half().save_pretrained(out)
        zoo.tokenizer().save_pretrained(out)
    return out


def sparsify_export(model: Path, out: Path, ttype: str) -> Path:
    from sparsify.export import GgufConfig, export

    if not out.exists():
        config = GgufConfig(tensor_type=ttype, importance="none")
        export(model, out, "gguf", overwrite=True, **config.model_dump())
    return out


def half_copy(model: Path, root: Path) -> Path:
    """``model`` with its weights rounded to float16."""
    import transformers as T

    out = root / f"{model.name}-f16"
    if not (out / "config.json").exists():
        T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16).save_pretrained(out)
        T.AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def llama_quantize(
    bin_dir: Path, f16: Path, out: Path, ttype: str, imatrix: Path | None = None, pure: bool = True
) -> Path:
    if not out.exists():
        cmd = [str(bin_dir / "llama-quantize")] + (["--pure"] if pure else [])
        cmd += ["--imatrix", str(imatrix)] if imatrix else []
        cmd += [str(f16), str(out), ttype.upper(), "2"]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def llama_imatrix(bin_dir: Path, f16: Path, out: Path) -> Path:
    if not out.exists():
        import pydoc_data.topics

        text = out.with_suffix(".txt")
        text.write_text("\n\n".join(pydoc_data.topics.topics.values()))
        cmd = [str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(out), "-c", "256",
               "--chunks", "32", "-t", "2", "--no-ppl"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def importance(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's per-column mean squares: ``in_sum2 / counts`` per weight name."""
    ts = tensors(path)
    out = {}
    for name, t in ts.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            counts = np.asarray(ts[base + ".counts"].data, dtype=np.float64).reshape(-1)
            out[base] = np.asarray(t.data, dtype=np.float64).reshape(-1) / counts[0]
    return out


def decoded(t) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type).reshape(-1, t.shape[0]).astype(np.float64)


def ours_with(w: torch.Tensor, ttype: str, imp: np.ndarray) -> np.ndarray:
    """sparsify's quantizer of ``ttype`` given llama-imatrix's importance, decoded."""
    from sparsify.algorithms.kquants import KTYPES, dequantize_k, quantize_k
    from sparsify.algorithms.legacy_quants import dequantize_legacy, quantize_legacy

    i = torch.from_numpy(imp)
    q = dequantize_k(quantize_k(w, ttype, i)) if ttype in KTYPES else dequantize_legacy(quantize_legacy(w, ttype, i))
    return q.double().numpy()


def compare(ttype: str, f16: dict, ours: dict, theirs: dict, imp: dict | None, theirs_imp: dict | None) -> dict:
    from gguf import GGML_QUANT_SIZES

    same_type = [n for n, t in theirs.items() if n in ours and ours[n].tensor_type == t.tensor_type and n in f16
                 and t.tensor_type.name.lower() == ttype]  # fmt: skip
    blocks = equal = 0
    sq_ours = sq_theirs = 0.0
    w_ours = w_theirs = 0.0
    for name in same_type:
        a, b = ours[name], theirs[name]
        size = GGML_QUANT_SIZES[a.tensor_type][1]
        ra = np.asarray(a.data).reshape(-1).view(np.uint8).reshape(-1, size)
        rb = np.asarray(b.data).reshape(-1).view(np.uint8).reshape(-1, size)
        blocks += ra.shape[0]
        equal += int((ra == rb).all(1).sum())
        w = decoded(f16[name])  # (rows, cols)
        sq_ours += float(((decoded(a) - w) ** 2).sum())
        sq_theirs += float(((decoded(b) - w) ** 2).sum())
        if imp is not None and theirs_imp is not None and name in imp:
            v = imp[name][None, :]  # (1, cols)
            w_ours += float((v * (ours_with(torch.from_numpy(w).float(), ttype, imp[name]) - w) ** 2).sum())
            w_theirs += float((v * (decoded(theirs_imp[name]) - w) ** 2).sum())
    row = {"type": ttype, "tensors": len(same_type), "blocks": blocks, "blocks_equal": equal,
           "rmse_ratio": (sq_ours / sq_theirs) ** 0.5 if sq_theirs else None}  # fmt: skip
    if w_theirs:
        row["imatrix_error_ratio"] = w_ours / w_theirs
    return row


def whole_files(bin_dir: Path, model: Path, mixes: list[str]) -> None:
    """Every tensor of llama-quantize's file beside ours at each named type, without an importance."""
    root = OUT / "llamacpp-files"
    root.mkdir(parents=True, exist_ok=True)
    half = half_copy(model, root)
    f16_path = sparsify_export(half, root / f"{model.name}-f16.gguf", "f16")
    print(f"CPU: {cpu_flags()}")
    print("| type | tensors | same type | same bytes | file bytes, llama-quantize / ours |")
    print("|---|---:|---:|---:|---:|")
    for mix in mixes:
        ours_path = sparsify_export(half, root / f"{model.name}-ours-{mix}.gguf", mix)
        theirs_path = llama_quantize(bin_dir, f16_path, root / f"{model.name}-llama-{mix}.gguf", mix, pure=False)
        ours, theirs = tensors(ours_path), tensors(theirs_path)
        same_type = [n for n, t in theirs.items() if n in ours and ours[n].tensor_type == t.tensor_type]
        same_bytes = [n for n in same_type if np.array_equal(np.asarray(ours[n].data), np.asarray(theirs[n].data))]
        row = {"model": model.name, "type": mix, "tensors": len(theirs), "same_type": len(same_type),
               "same_bytes": len(same_bytes), "bytes_llama": theirs_path.stat().st_size,
               "bytes_ours": ours_path.stat().st_size, "cpu_flags": cpu_flags()}  # fmt: skip
        with open(OUT / "llamacpp-files.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {mix} | {len(theirs)} | {len(same_type)} | {len(same_bytes)} | "
              f"{row['bytes_llama']:,} / {row['bytes_ours']:,} |")  # fmt: skip
        for n in sorted(set(same_type) - set(same_bytes)):
            print(f"  differs: {n} ({theirs[n].tensor_type.name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--model", type=Path, help="a float model folder: compare whole files at --mixes")
    ap.add_argument("--mixes", nargs="+", default=["q3_k_m", "q4_k_m", "q5_k_m", "q4_0", "q6_k"])
    args = ap.parse_args()
    bin_dir = Path(os.environ["B"])
    if args.model is not None:
        whole_files(bin_dir, args.model, args.mixes)
        return
    root = OUT / "llamacpp-blocks"
    root.mkdir(parents=True, exist_ok=True)
    model = folder(root)
    f16_path = sparsify_export(model, root / "f16.gguf", "f16")
    f16 = tensors(f16_path)
    imat_path = llama_imatrix(bin_dir, f16_path, root / "imatrix.gguf")
    imp = importance(imat_path)
    print(f"CPU: {cpu_flags()}")
    print("| type | matrices | blocks | byte-equal blocks | RMSE ours / llama-quantize | imatrix error ours / theirs |")
    print("|---|---:|---:|---:|---:|---:|")
    for ttype in args.types:
        ours = tensors(sparsify_export(model, root / f"ours-{ttype}.gguf", ttype))
        theirs = tensors(llama_quantize(bin_dir, f16_path, root / f"llama-{ttype}.gguf", ttype))
        theirs_imp = None
        if ttype != "q8_0":
            path = llama_quantize(bin_dir, f16_path, root / f"llama-{ttype}-imatrix.gguf", ttype, imat_path)
            theirs_imp = tensors(path)
        row = compare(ttype, f16, ours, theirs, imp if theirs_imp else None, theirs_imp)
        row["cpu_flags"] = cpu_flags()
        with open(OUT / "llamacpp-blocks.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        ratio = row.get("imatrix_error_ratio")
        print(
            f"| {ttype} | {row['tensors']} | {row['blocks']} | {row['blocks_equal']} "
            f"({row['blocks_equal'] / max(1, row['blocks']):.1%}) | {row['rmse_ratio']:.4f} | "
            f"{'—' if ratio is None else f'{ratio:.4f}'} |"
        )


if __name__ == "__main__":
    main()
