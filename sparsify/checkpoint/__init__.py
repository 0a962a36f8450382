"""Checkpoint I/O: read a model lazily, check it against its config, write the output safely.

- :mod:`.source`: the files transformers would read, tensors on request (safetensors, ``.bin``, GGUF).
- :mod:`.skeleton`: the model on the meta device, checked against the checkpoint, filled a module at a time.
- :mod:`.lazy`: the layer provider the loop reads layers from and saves them through.
- :mod:`.writer`: each finished layer to a file, then Hub-style shards, one tensor in memory at a time.
- :mod:`.atomic`: atomic renames and folders written whole (the bottom: no other module of the package).
- :mod:`.output`: output-path checks, the locked partial folder, the final rename.
- :mod:`.stage_state`: what ``--resume`` needs of one stage, kept in that folder.
"""

from sparsify.checkpoint.atomic import replace_dir
from sparsify.checkpoint.lazy import LazyLayers
from sparsify.checkpoint.output import OutputPath, Partial, check_output, partial_output
from sparsify.checkpoint.skeleton import (
    KeyMap,
    build_skeleton,
    check_layer_count,
    check_tensors,
    materialize,
    release,
    set_tensor,
    tied_names,
    verify,
)
from sparsify.checkpoint.source import (
    SAFE_DTYPES,
    WEIGHT_SUFFIXES,
    ModelDir,
    SafetensorsSource,
    StateDictSource,
    TensorInfo,
    TensorSource,
    cache_dir,
    gguf_to_folder,
    open_model,
)
from sparsify.checkpoint.writer import (
    DEFAULT_SHARD_BYTES,
    LayerFiles,
    assemble,
    copy_aux_files,
    plan_shards,
    write_shard,
)

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "SAFE_DTYPES",
    "WEIGHT_SUFFIXES",
    "KeyMap",
    "LayerFiles",
    "LazyLayers",
    "ModelDir",
    "OutputPath",
    "Partial",
    "SafetensorsSource",
    "StateDictSource",
    "TensorInfo",
    "TensorSource",
    "assemble",
    "build_skeleton",
    "cache_dir",
    "check_layer_count",
    "check_output",
    "check_tensors",
    "copy_aux_files",
    "gguf_to_folder",
    "materialize",
    "open_model",
    "partial_output",
    "plan_shards",
    "release",
    "replace_dir",
    "set_tensor",
    "tied_names",
    "verify",
    "write_shard",
]
