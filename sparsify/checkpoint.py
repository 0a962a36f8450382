"""Checkpoint I/O: resolve a model, read tensors lazily, write safetensors as they are produced.

The layer-wise loop never holds the whole model: the skeleton lives on the meta device, one layer at
a time is read from the safetensors files (each file opened, read and closed again, so no mapping
stays resident) and each finished tensor is written straight to its planned place in the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sparsify.errors import SparsifyError

log = logging.getLogger(__name__)

SAFE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SPARSIFY_FILES = ("recipe.yaml", "sparsify_report.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.tensor([], dtype=self.dtype).element_size()


class TensorSource:
    """Read-only view of a checkpoint's tensors by key."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def get_many(self, keys: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def iter_tensors(self, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        """``(key, tensor)`` one at a time, holding only the current tensor in memory."""
        for key in keys:
            yield key, self.get_many([key])[key]

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class SafetensorsSource(TensorSource):
    """One or many ``.safetensors`` files; headers are read up front, data only on request."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        s = f.get_slice(key)
                        self._file_of[key] = path
                        self._info[key] = TensorInfo(SAFE_DTYPES[s.get_dtype()], tuple(s.get_shape()))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise SparsifyError(f"cannot read {path.name}: {e} (corrupt or truncated checkpoint?)") from e

    def keys(self) -> list[str]:
        return list(self._file_of)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def iter_tensors(self, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        """One tensor at a time, each file opened once (not once per tensor)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._file_of[k], []).append(k)
        for path, ks in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in ks:
                        yield k, f.get_tensor(k).clone()
            except Exception as e:
                raise SparsifyError(f"cannot read tensors from {path.name}: {e}") from e

    def get_many(self, keys: list[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._file_of[k], []).append(k)
        out: dict[str, Tensor] = {}
        for path, ks in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k).clone()
            except SparsifyError:
                raise
            except Exception as e:
                raise SparsifyError(f"cannot read tensors from {path.name}: {e}") from e
        return out


class StateDictSource(TensorSource):
    """Tensors already in memory (or memory-mapped), e.g. from ``torch.load(weights_only=True)``."""

    def __init__(self, tensors: dict[str, Tensor]):
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def info(self, key: str) -> TensorInfo:
        t = self._t[key]
        return TensorInfo(t.dtype, tuple(t.shape))

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def get_many(self, keys: list[str]) -> dict[str, Tensor]:
        return {k: self._t[k].clone() for k in keys}


@dataclass
class ModelDir:
    """A resolved input model: its folder, config and tensors."""

    path: Path
    source: TensorSource
    config_path: Path

    def load_config(self, trust_remote_code: bool = False):  # -> PretrainedConfig
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise SparsifyError(f"cannot read {self.config_path}: {e}") from e


def open_model(path: str | Path) -> ModelDir:
    """Resolve ``path`` (a Hugging Face folder or a ``.gguf`` file) to a :class:`ModelDir`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SparsifyError(f"model not found: {p}")
    if p.is_file():
        if p.suffix == ".gguf":
            return open_model(gguf_to_folder(p))
        raise SparsifyError(f"{p} is a file; pass a model folder (with config.json) or a .gguf file")
    config_path = p / "config.json"
    if not config_path.is_file():
        raise SparsifyError(f"{p} has no config.json; is it a Hugging Face model folder?")
    return ModelDir(path=p, source=_open_weights(p), config_path=config_path)


def _open_weights(folder: Path) -> TensorSource:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except Exception as e:
            raise SparsifyError(f"cannot read {index.name}: {e}") from e
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SparsifyError(f"{index.name} names missing shard(s): {', '.join(missing)}")
        return SafetensorsSource(files)
    single = sorted(folder.glob("*.safetensors"))
    if single:
        return SafetensorsSource(single)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        tensors: dict[str, Tensor] = {}
        for b in bins:
            try:
                tensors.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise SparsifyError(f"cannot load {b.name} safely (weights_only=True): {e}") from e
        return StateDictSource(tensors)
    raise SparsifyError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")


def cache_dir() -> Path:
    root = (
        os.environ.get("SPARSIFY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsify"
    )
    return Path(root)


def gguf_to_folder(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder (needs ``gguf`` and ``accelerate``)."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SparsifyError("reading .gguf needs the gguf extra: pip install 'sparsify-llm[gguf]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", path.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise SparsifyError(f"cannot load {path.name} as GGUF: {e}") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------------------------- output


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block completes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SparsifyError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder we create
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_output_path(model_path: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that would overwrite or sit inside the input, or exists without ``overwrite``."""
    model_dir = (model_path if model_path.is_dir() else model_path.parent).resolve()
    out_r = Path(out).expanduser().resolve()
    if out_r == model_dir or model_dir in out_r.parents:
        raise SparsifyError(f"output {out} is the model folder or inside it; choose another folder")
    if out_r.exists() and not overwrite:
        raise SparsifyError(f"{out} exists; pass --overwrite to replace it")
    if out_r.exists() and not out_r.is_dir():
        raise SparsifyError(f"{out} exists and is not a folder")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and generation files; never weights, indexes, code or our own outputs."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in INDEX_FILES or f.name in SPARSIFY_FILES:
            continue
        if f.suffix in WEIGHT_SUFFIXES or f.suffix == ".py":
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


class SafetensorsWriter:
    """Writes a planned set of tensors into sharded safetensors files, each tensor as it arrives.

    The plan (keys, dtypes, shapes) is known before any data: the output has the input's keys. So
    each shard's header is written first and every tensor goes straight to its offset; nothing is
    buffered beyond the tensor being written.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, TensorInfo]], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = folder
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for key, info in plan:
            if shards[-1] and size + info.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, info))
            size += info.nbytes
        n = len(shards)
        self.names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._where: dict[str, tuple[int, int, TensorInfo]] = {}  # key -> (shard, absolute offset, info)
        self._files = []
        self.total_bytes = 0
        for shard_index, (name, entries) in enumerate(zip(self.names, shards, strict=True)):
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
            start = 8 + len(raw)
            f = open(folder / name, "wb")  # noqa: SIM115 - closed in close()
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + offset)
            self._files.append(f)
            pos = start
            for key, info in entries:
                self._where[key] = (shard_index, pos, info)
                pos += info.nbytes
            self.total_bytes += start + offset
        self._pending = set(self._where)
        self.parameters = 0  # floating-point elements written
        self.nonzeros = 0

    def write(self, key: str, tensor: Tensor) -> None:
        shard, pos, info = self._where[key]
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} differs from planned {info.shape}")
        data = tensor.detach().to(device="cpu", dtype=info.dtype).contiguous().reshape(-1)
        if data.is_floating_point():
            self.parameters += data.numel()
            self.nonzeros += int(torch.count_nonzero(data))
        f = self._files[shard]
        f.seek(pos)
        f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._pending.discard(key)

    def close(self) -> None:
        for f in self._files:
            f.close()
        if self._pending:
            raise RuntimeError(
                f"{len(self._pending)} planned tensors were never written, e.g. {sorted(self._pending)[0]}"
            )
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": sum(info.nbytes for _, _, info in self._where.values())},
                "weight_map": {k: self.names[s] for k, (s, _, _) in sorted(self._where.items())},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for f in self._files:
            f.close()


# ------------------------------------------------------------------------------------- module I/O


class KeyMap:
    """Model parameter names ↔ checkpoint keys (a checkpoint may omit or add the base-model prefix)."""

    def __init__(self, model: nn.Module, source: TensorSource):
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.to_ckpt: dict[str, str] = {}
        for name in model.state_dict(keep_vars=True):
            for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
                if candidate in source:
                    self.to_ckpt[name] = candidate
                    break

    def require(self, names: list[str]) -> list[str]:
        missing = [n for n in names if n not in self.to_ckpt]
        if missing:
            raise SparsifyError(
                f"checkpoint has no tensor for {missing[0]} ({len(missing)} missing): incomplete or mismatched checkpoint"
            )
        return [self.to_ckpt[n] for n in names]


def build_skeleton(config, encoder: bool, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device (buffers stay real: rotary tables, masks)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from sparsify.runtime import CONFIG_KEY, register

    if getattr(config, CONFIG_KEY, None) is not None:
        register()  # a checkpoint with sparsify attention patterns calibrates with them active
    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as e:
        raise SparsifyError(f"transformers cannot build model_type {config.model_type!r}: {e}") from e
    return model.eval()


def set_tensor(root: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` (dotted, relative to ``root``) with ``value``."""
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def materialize(
    root: nn.Module,
    prefix: str,
    names: list[str],
    source: TensorSource,
    keymap: KeyMap,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> dict[str, torch.dtype]:
    """Load ``names`` (relative to ``root``, whose full path is ``prefix``) from the checkpoint.

    Floating tensors are cast to ``dtype``; returns each name's stored dtype.
    """
    full = [f"{prefix}.{n}" if prefix else n for n in names]
    keys = keymap.require(full)
    tensors = source.get_many(keys)
    stored: dict[str, torch.dtype] = {}
    for name, key in zip(names, keys, strict=True):
        t = tensors[key]
        stored[name] = t.dtype
        set_tensor(root, name, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
    return stored


def release(root: nn.Module) -> None:
    """Move a module's parameters back to the meta device, freeing their memory."""
    for name, p in list(root.named_parameters()):
        set_tensor(root, name, torch.empty_like(p, device="meta"))
