"""``MODEL`` as a Hugging Face repo id: fetched into the standard cache with ``huggingface_hub``.

A local path always wins; a string that is not a local path but a valid repo id (``org/name``) is
looked up on the Hub at ``revision`` (a branch, tag or commit) and only the files sparsify reads are
downloaded: configs, tokenizer files, code, licences and the safetensors weights (``.bin`` only when a
repo has no safetensors). ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE``/``HF_HOME`` are honoured as
everywhere in the ecosystem; with the Hub out of reach a cached snapshot is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sparsify.errors import SparsifyError

log = logging.getLogger(__name__)

SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "*.md", "LICENSE*", "NOTICE*"]


def is_repo_id(text: str) -> bool:
    """``org/name`` (or ``name``) that is not a path a user would type for a folder."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision``, downloading what is missing."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*SMALL_FILES, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*SMALL_FILES, "*.bin"]))
    except RevisionNotFoundError:
        raise SparsifyError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub") from None
    except GatedRepoError:
        raise SparsifyError(f"{repo_id} is gated: accept its terms on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise SparsifyError(
            f"model not found: {repo_id} is neither a local folder nor a Hub repository you can access"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise SparsifyError(
            f"model not found: {repo_id}{at} is not a local folder, not in the Hugging Face cache"
            f" ({constants.HF_HUB_CACHE}), and {why}"
        ) from None
    except Exception as e:  # network and HTTP errors from huggingface_hub
        raise SparsifyError(f"cannot fetch {repo_id}{at} from the Hugging Face Hub: {e}") from e
    log.info("using %s%s from %s", repo_id, at, folder)
    return folder
