"""Writing a checkpoint: each finished layer to its own file, then the shards, one tensor in memory at a time.

The loop hands over whatever a layer holds after its passes (names, shapes and dtypes may differ from
the input's); :meth:`LayerFiles.save` writes it atomically under the run's state folder. When every
layer is done, :func:`assemble` plans the shards with the Hub's rules (``huggingface_hub``'s splitter,
its default 5 GB shard size, its index format) over the layer files and the untouched input tensors,
and writes each shard header-first, streaming tensor by tensor. A shard is renamed into place only
when complete and its layer files are deleted after it, so disk use peaks near one output plus one
shard, and an assembly that is interrupted continues from the shards already written.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparsify import interrupts
from sparsify.checkpoint.source import SAFE_DTYPES, SAFE_NAMES, SafetensorsSource, TensorInfo, TensorSource
from sparsify.errors import SparsifyError

try:
    from huggingface_hub.serialization._base import MAX_SHARD_SIZE, parse_size_to_int
except ImportError:  # pragma: no cover - the layout moved between huggingface_hub releases
    MAX_SHARD_SIZE, parse_size_to_int = "5GB", None

DEFAULT_SHARD_BYTES = parse_size_to_int(MAX_SHARD_SIZE) if parse_size_to_int else 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"


def fsync_replace(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable, then rename it to ``final`` (atomic on one filesystem)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    fsync_replace(tmp, path)


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """One safetensors file, atomically (a crash leaves the old file or none, never half of one)."""
    entries = [(k, TensorInfo(t.dtype, tuple(t.shape))) for k, t in tensors.items()]
    write_shard(path, entries, iter(tensors.items()))


def _header(entries: list[tuple[str, TensorInfo]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, info in entries:
        header[key] = {
            "dtype": SAFE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class ShardCounts:
    parameters: int = 0  # floating-point elements written
    nonzeros: int = 0
    bytes: int = 0
    quantized: int = 0  # weights stored as integers (an int8 ``weight``, or the shape a ``weight_shape`` gives)


def write_shard(
    path: Path, entries: list[tuple[str, TensorInfo]], tensors: Iterator[tuple[str, Tensor]]
) -> ShardCounts:
    """Write one safetensors file: header first, then each tensor at its offset as it arrives (any order)."""
    where: dict[str, tuple[int, TensorInfo]] = {}
    head = _header(entries)
    pos = len(head)
    for key, info in entries:
        where[key] = (pos, info)
        pos += info.nbytes
    counts = ShardCounts(bytes=pos)
    pending = set(where)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(head)
        f.truncate(pos)
        for key, tensor in tensors:
            interrupts.check()
            offset, info = where[key]
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise RuntimeError(f"{key}: {tensor.dtype}{tuple(tensor.shape)} differs from planned {info}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.is_floating_point():
                counts.parameters += data.numel()
                counts.nonzeros += int(torch.count_nonzero(data))
            elif key.endswith(".weight") and data.dtype == torch.int8:
                counts.quantized += data.numel()
            elif key.endswith(".weight_shape"):  # compressed-tensors' packed weights: their unpacked shape
                counts.quantized += int(torch.prod(data))
            f.seek(offset)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))  # no copy of the bytes
            pending.discard(key)
        if pending:
            raise RuntimeError(f"{len(pending)} planned tensors were never written, e.g. {sorted(pending)[0]}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return counts


def plan_shards(entries: list[tuple[str, TensorInfo]], max_shard_bytes: int | str) -> dict[str, list[str]]:
    """Shard file name → keys, in order, by ``huggingface_hub``'s splitter (the Hub's names and rules)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(entries),
        get_storage_size=lambda info: info.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    return {name: list(keys) for name, keys in split.filename_to_tensors.items()}


class LayerFiles:
    """Each finished layer's tensors in ``folder/NNNNN.safetensors`` and its report data in ``NNNNN.json``."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"{index:05d}.safetensors", self.folder / f"{index:05d}.json"

    def save(
        self, index: int, entries: list[tuple[str, TensorInfo]], tensors: Iterator[tuple[str, Tensor]], info: dict
    ) -> None:
        """Layer ``index``: ``entries`` (names, dtypes, shapes) planned first, ``tensors`` streamed one at a time."""
        st, meta = self._paths(index)
        write_shard(st, entries, tensors)
        write_json(meta, info)

    def info(self, index: int) -> dict | None:
        _, meta = self._paths(index)
        return json.loads(meta.read_text()) if meta.is_file() else None

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.safetensors"))

    def source(self) -> SafetensorsSource:
        return SafetensorsSource(self.files())


def assemble(
    folder: Path,
    layer_files: LayerFiles,
    model_source: TensorSource,
    model_keys: list[tuple[str, str]],
    state_dir: Path,
    max_shard_bytes: int | str = DEFAULT_SHARD_BYTES,
) -> ShardCounts:
    """Write the output's shards into ``folder`` from the layer files plus ``model_keys`` of the input.

    ``model_keys`` are ``(input key, output key)`` pairs copied byte for byte (embeddings, heads,
    anything no pass touched). The plan is kept in ``state_dir/shards.json``, so a second call after an
    interruption writes only the shards that are not complete yet.
    """
    plan_path = state_dir / "shards.json"
    layers = layer_files.source()
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        entries: dict[str, tuple[str, str, TensorInfo]] = {}  # output key -> (origin, origin key, info)
        for key in layers.keys():
            entries[key] = ("layer", key, layers.info(key))
        for src_key, out_key in model_keys:
            if out_key in entries:
                raise SparsifyError(f"output tensor {out_key} is produced twice")
            entries[out_key] = ("model", src_key, model_source.info(src_key))
        shards = plan_shards([(k, e[2]) for k, e in entries.items()], max_shard_bytes)
        plan = {
            "shards": shards,
            "tensors": {k: [o, ok, SAFE_NAMES[i.dtype], list(i.shape)] for k, (o, ok, i) in entries.items()},
            "done": {},
        }
        write_json(plan_path, plan)
    tensors = plan["tensors"]
    total = ShardCounts()
    for name, keys in plan["shards"].items():
        done = plan["done"].get(name)
        if done is None or not (folder / name).is_file():
            info = {k: TensorInfo(SAFE_DTYPES[tensors[k][2]], tuple(tensors[k][3])) for k in keys}
            counts = write_shard(
                folder / name, [(k, info[k]) for k in keys], _stream(keys, tensors, layers, model_source)
            )
            done = [counts.parameters, counts.nonzeros, counts.bytes, counts.quantized]
            plan["done"][name] = done
            write_json(plan_path, plan)
            _drop_finished_layer_files(layer_files, plan)
        total.parameters += done[0]
        total.nonzeros += done[1]
        total.bytes += done[2]
        total.quantized += done[3] if len(done) > 3 else 0
    if len(plan["shards"]) > 1:
        index = {
            "metadata": {
                "total_size": sum(TensorInfo(SAFE_DTYPES[t[2]], tuple(t[3])).nbytes for t in tensors.values())
            },
            "weight_map": {k: name for name, keys in plan["shards"].items() for k in sorted(keys)},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        write_json(folder / INDEX_NAME, index)
    return total


def _stream(
    keys: list[str], tensors: dict[str, list], layers: SafetensorsSource, model: TensorSource
) -> Iterator[tuple[str, Tensor]]:
    from_layers = [k for k in keys if tensors[k][0] == "layer"]
    from_model = {tensors[k][1]: k for k in keys if tensors[k][0] == "model"}
    yield from layers.iter_tensors(from_layers)
    for src_key, tensor in model.iter_tensors(list(from_model)):
        yield from_model[src_key], tensor


def _drop_finished_layer_files(layer_files: LayerFiles, plan: dict) -> None:
    """Delete each layer file whose every tensor is now in a complete shard."""
    written = {k for name in plan["done"] for k in plan["shards"][name]}
    for path in layer_files.files():
        try:
            keys = SafetensorsSource([path]).keys()
        except SparsifyError:
            continue
        if all(k in written for k in keys):
            path.unlink()


AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".md")
NOT_COPIED = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "adapter_config.json",  # an adapter's config without its weights would make loaders look for them
    "recipe.yaml",
    "sparsify_report.json",
)


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer, generation and licence files; never weights, indexes, adapters or code."""
    import shutil

    copied = []
    for f in sorted(src.iterdir()):
        name = f.name
        wanted = f.suffix in AUX_SUFFIXES or name.upper().startswith(("LICENSE", "NOTICE"))
        if not f.is_file() or not wanted or name in NOT_COPIED or name.startswith("."):
            continue
        shutil.copy2(f, dst / name)
        copied.append(name)
    return copied
