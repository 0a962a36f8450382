"""Reading a model: the files transformers would read, their tensors lazily, nothing else.

A folder's weights are exactly what ``from_pretrained`` reads: ``model.safetensors.index.json`` and
the shards it names, else ``model.safetensors``, else ``pytorch_model.bin(.index.json)`` through
``torch.load(weights_only=True)``. Other weight files beside them (``adapter_model.safetensors``, a
leftover ``model_old.safetensors``) are never read; shard names are confined to the folder. Only
headers are read up front; each tensor's data is read when asked for, file by file, and nothing
stays mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from sparsify.checkpoint.atomic import replace_dir
from sparsify.errors import SparsifyError
from sparsify.progress import NOTICE, NoProgress, Progress, library_bars_silenced
from sparsify.sizes import fmt_bytes, folder_bytes

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
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


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

    files: tuple[Path, ...] = ()  # the files it reads

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
    """``.safetensors`` files; headers read up front, data only on request.

    ``weight_map`` (an index's) says which file holds each key; without one, every key of every file
    is served and a key found in two files is an error.
    """

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None):
        from safetensors import safe_open

        self.files = tuple(files)
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self.unlisted: list[str] = []  # keys present in a shard that the index does not list (not read)
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if weight_map is not None and weight_map.get(key) != path:
                            self.unlisted.append(key)
                            continue
                        if key in self._file_of:
                            raise SparsifyError(
                                f"tensor {key} is in both {self._file_of[key].name} and {path.name}; which one is the model?"
                            )
                        s = f.get_slice(key)
                        self._file_of[key] = path
                        self._info[key] = TensorInfo(SAFE_DTYPES[s.get_dtype()], tuple(s.get_shape()))
            except SparsifyError:
                raise
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise SparsifyError(f"cannot read {path.name}: {e} (corrupt or truncated checkpoint?)") from e
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self._file_of]
            if absent:
                raise SparsifyError(
                    f"{SAFE_INDEX} puts {absent[0]} in {weight_map[absent[0]].name}, which does not hold it"
                    f" ({len(absent)} such tensors): incomplete or mismatched shards"
                )

    def keys(self) -> list[str]:
        return list(self._file_of)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _by_file(self, keys: list[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._file_of[k], []).append(k)
        return by_file

    def iter_tensors(self, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        """One tensor at a time, each file opened once (not once per tensor)."""
        from safetensors import safe_open

        for path, ks in self._by_file(keys).items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for k in ks:
                        yield k, f.get_tensor(k).clone()
            except Exception as e:
                raise SparsifyError(f"cannot read tensors from {path.name}: {e}") from e

    def get_many(self, keys: list[str]) -> dict[str, Tensor]:
        return dict(self.iter_tensors(keys))


class StateDictSource(TensorSource):
    """Tensors already in memory (or memory-mapped), e.g. from ``torch.load(weights_only=True)``."""

    def __init__(self, tensors: dict[str, Tensor], files: tuple[Path, ...] = ()):
        self._t = tensors
        self.files = files

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
    notes: list[str] = field(default_factory=list)
    held: Any = field(default=None, repr=False, compare=False)  # a cached folder's shared lock, while it is read

    def load_config(self, trust_remote_code: bool = False):  # -> PretrainedConfig
        from sparsify.runtime.format import read_config

        raw = _read_json(self.config_path)
        if raw.get("auto_map") and not trust_remote_code:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if raw.get("model_type") not in CONFIG_MAPPING:
                raise SparsifyError(
                    f"{self.path} needs its own Python code (auto_map in config.json, model_type"
                    f" {raw.get('model_type')!r}); pass --trust-remote-code if you trust its author"
                )
        try:
            return read_config(self.path, trust_remote_code)
        except SparsifyError:
            raise
        except Exception as e:
            raise SparsifyError(f"cannot read {self.config_path}: {e}") from e

    def code_files(self) -> list[Path]:
        """The Python files a config's ``auto_map`` needs beside the weights (copied to the output).

        Refused if ``auto_map`` names a module the folder lacks: an output must never point at code
        that is not there.
        """
        auto_map = _read_json(self.config_path).get("auto_map") or {}
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        modules = {r.rsplit(".", 1)[0] for r in refs if "--" not in r}  # "org/repo--module.Class" lives elsewhere
        missing = sorted(m for m in modules if not (self.path / f"{m}.py").is_file())
        if missing:
            raise SparsifyError(
                f"config.json's auto_map names {missing[0]}.py, which {self.path} does not have;"
                " the output could not be loaded with its code"
            )
        return sorted(self.path.glob("*.py")) if modules else []

    def read_paths(self) -> list[Path]:
        """Every file this model is read from (weights, config, tokenizer...), for output-path checks."""
        return [self.path, self.config_path, *self.source.files, *(p for p in self.path.iterdir() if p.is_file())]

    def weight_files(
        self, known: dict[str, dict[str, Any]] | None = None, progress: Progress | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each weight file (by its path in the model folder): its size, ``stat`` identity and the sha256 of all of
        its bytes. A file whose identity is in ``known`` unchanged (device, inode, size, mtime and ctime: any write
        changes the ctime, whatever it does to the mtime) keeps the digest recorded there instead of being read
        again; one touched but not changed is read again and gives the same digest."""
        files: dict[str, dict[str, Any]] = {}
        for f in (progress or NoProgress()).track(self.source.files, len(self.source.files), "hashing the input"):
            st = f.stat()
            stamp: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                                     "inode": st.st_ino, "device": st.st_dev}  # fmt: skip
            name = f.relative_to(self.path).as_posix() if f.is_relative_to(self.path) else f.name
            old = (known or {}).get(name) or {}
            if all(old.get(k) == v for k, v in stamp.items()) and isinstance(old.get("sha256"), str):
                stamp["sha256"] = old["sha256"]
            else:
                with open(f, "rb") as fh:
                    stamp["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
            files[name] = stamp
        return files

    def fingerprint(self, files: dict[str, dict[str, Any]]) -> str:
        """A digest of the config and of every byte of each weight file (``files``: :meth:`weight_files`)."""
        h = hashlib.sha256(self.config_path.read_bytes())
        for name, stamp in files.items():
            h.update(f"{name}:{stamp['size']}:{stamp['sha256']}\n".encode())
        return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SparsifyError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise SparsifyError(f"{path} is not a JSON object")
    return data


def open_model(path: str | Path, revision: str | None = None) -> ModelDir:
    """Resolve ``path`` (a Hugging Face folder, a Hub repo id, or a ``.gguf`` file) to a :class:`ModelDir`."""
    from sparsify.checkpoint.hub import fetch, is_repo_id

    p = Path(path).expanduser()
    if not p.exists():
        if not is_repo_id(str(path)):
            raise SparsifyError(f"model not found: {p}")
        p = fetch(str(path), revision)
    elif revision is not None:
        raise SparsifyError(f"--revision applies to Hub repo ids; {p} is a local path")
    if p.is_file():
        if p.suffix == ".gguf":
            folder = gguf_to_folder(p)
            held = hold_cached(folder)  # before it is read: sparsify cache --clear leaves it while held
            md = open_model(folder)
            md.held = held
            return md
        raise SparsifyError(f"{p} is a file; pass a model folder (with config.json) or a .gguf file")
    config_path = p / "config.json"
    if not config_path.is_file():
        raise SparsifyError(f"{p} has no config.json; is it a Hugging Face model folder?")
    source, notes = _open_weights(p)
    return ModelDir(path=p, source=source, config_path=config_path, notes=notes)


def _shard_path(folder: Path, index_name: str, name: object) -> Path:
    """A shard named by an index, confined to ``folder`` (symlinks inside it, as in the HF cache, are fine)."""
    if not isinstance(name, str) or not name:
        raise SparsifyError(f"{index_name} names a shard {name!r}; expected a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise SparsifyError(f"{index_name} names shard {name!r} outside the model folder; refusing to read it")
    return folder / pure


def _index(folder: Path, name: str) -> dict[str, Path]:
    data = _read_json(folder / name)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SparsifyError(f"{name} has no weight_map")
    files = {f: _shard_path(folder, name, f) for f in set(weight_map.values())}
    missing = sorted(f for f, p in files.items() if not p.is_file())
    if missing:
        raise SparsifyError(f"{name} names missing shard(s): {', '.join(missing)}")
    return {key: files[f] for key, f in weight_map.items()}


def _open_weights(folder: Path) -> tuple[TensorSource, list[str]]:
    """The weights transformers would load from ``folder``, and notes on weight files it would not."""
    if (folder / SAFE_INDEX).is_file():
        weight_map = _index(folder, SAFE_INDEX)
        files = sorted(set(weight_map.values()))
        source: TensorSource = SafetensorsSource(files, weight_map)
        used = {SAFE_INDEX, *(f.name for f in files)}
    elif (folder / SAFE_WEIGHTS).is_file():
        source, used = SafetensorsSource([folder / SAFE_WEIGHTS]), {SAFE_WEIGHTS}
    elif (folder / BIN_INDEX).is_file() or (folder / BIN_WEIGHTS).is_file():
        if (folder / BIN_INDEX).is_file():
            bins = sorted(set(_index(folder, BIN_INDEX).values()))
            used = {BIN_INDEX, *(b.name for b in bins)}
        else:
            bins, used = [folder / BIN_WEIGHTS], {BIN_WEIGHTS}
        tensors: dict[str, Tensor] = {}
        for b in bins:
            try:
                part = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise SparsifyError(f"cannot load {b.name} safely (weights_only=True): {e}") from e
            if not isinstance(part, dict):
                raise SparsifyError(f"{b.name} is not a state dict")
            twice = sorted(set(part) & set(tensors))
            if twice:
                raise SparsifyError(f"tensor {twice[0]} is in more than one .bin file")
            tensors.update(part)
        source = StateDictSource(tensors, tuple(bins))
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        found = f"; found only {', '.join(others)}, which transformers does not load as the model" if others else ""
        raise SparsifyError(f"{folder} has no {SAFE_WEIGHTS} (or {SAFE_INDEX}, {BIN_WEIGHTS}){found}")
    ignored = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name not in used)
    notes = [f"not read (transformers would not load them as the model): {', '.join(ignored)}"] if ignored else []
    unlisted = getattr(source, "unlisted", [])
    if unlisted:
        notes.append(
            f"not read: {len(unlisted)} tensor(s) in the shards that {SAFE_INDEX} does not list, e.g. {unlisted[0]}"
        )
    return source, notes


def cache_dir() -> Path:
    root = (
        os.environ.get("SPARSIFY_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsify"
    )
    return Path(root)


def hold_cached(folder: Path) -> Any:
    """A shared lock on a cached folder (``<folder>.lock`` beside it) for as long as the returned file is open:
    ``sparsify cache --clear`` removes only folders no process holds."""
    f = open(folder.parent / f"{folder.name}.lock", "a")  # noqa: SIM115  (held open: the lock lives with it)
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


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
    # transformers' GGUF loader draws a tqdm bar that its progress-bar switch does not reach: dropped unless --debug
    quiet = contextlib.nullcontext() if log.isEnabledFor(logging.DEBUG) else library_bars_silenced()
    try:
        with quiet:
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise SparsifyError(f"cannot load {path.name} as GGUF: {e}") from e
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with replace_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.log(NOTICE, "%s converted to float32 safetensors to be read, once: %s kept in %s (sparsify cache --clear"
            " frees it)", path.name, fmt_bytes(folder_bytes(target)), target)  # fmt: skip
    return target
