"""Peak memory of the layer-wise loop: random-init Llama models of one width with 8 and 32 layers.

    python benchmarks/bench_memory.py [--hidden 2048] [--layers 8 32]

Each checkpoint is written tensor by tensor (never whole in memory), then `sparsify prune` runs in a
fresh process per model; the peak RSS is that process's own ru_maxrss, from its report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT
from sparsify.checkpoint import TensorInfo, write_shard
from tests.zoo import tokenizer


def write_random_llama(folder: Path, hidden: int, layers: int, dtype: torch.dtype) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)

    def tensors():
        for key, shape in shapes.items():
            t = torch.ones(shape) if "norm" in key else torch.randn(shape, generator=g) * 0.02
            yield key, t.to(dtype)

    write_shard(folder / "model.safetensors", [(k, TensorInfo(dtype, s)) for k, s in shapes.items()], tensors())
    return sum(torch.Size(s).numel() for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        src, out = OUT / f"random-{n}", OUT / f"random-{n}-out"
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        params = write_random_llama(src, args.hidden, n, torch.bfloat16)
        cmd = [
            sys.executable, "-m", "sparsify.cli", "prune", str(src), "-o", str(out), "--method", "wanda",
            "--sparsity", "0.5", "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--json",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        report = json.loads(proc.stdout)
        row = {
            "layers": n,
            "hidden": args.hidden,
            "parameters": params,
            "checkpoint_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
            "peak_rss_bytes": report["totals"]["peak_rss_bytes"],  # ru_maxrss of the child itself
            "seconds": time.perf_counter() - t0,
            "calibration": f"{args.samples} x {args.seq_len}",
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    if len(rows) >= 2:
        print(f"peak ratio {rows[-1]['layers']}/{rows[0]['layers']} layers: "
              f"{rows[-1]['peak_rss_bytes'] / rows[0]['peak_rss_bytes']:.3f}")  # fmt: skip
    (OUT / "memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
