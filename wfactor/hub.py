"""Hugging Face Hub ids as model inputs: ``org/name`` or ``org/name@revision`` (``hf://`` prefix optional).

Resolution goes through huggingface_hub and its cache: only the weights (``*.safetensors``, their index)
and the config/tokenizer files beside them are fetched, never ``.bin`` checkpoints or other folders.
``HF_HUB_OFFLINE=1`` (read when a model is resolved, not when Python starts) resolves from the local cache
alone; ``HF_HUB_CACHE`` / ``HF_HOME`` choose the cache as huggingface_hub does.

Ambiguity: an argument that exists on disk is always a local path. Otherwise it is a Hub id when it is
``hf://ID`` or has exactly the form ``org/name[@revision]`` (no leading ``.`` or ``/``, two segments, and not
ending in a weights suffix such as ``.safetensors``); anything else is a local path that does not exist.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import InputError, NotFoundError
from .format.shards import index_shard_names

HF_PREFIX = "hf://"
_SEGMENT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REV = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}"
HUB_ID_RE = re.compile(rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?:@(?P<rev>{_REV}))?$")
# with hf:// a single-segment (legacy, org-less) repo name is allowed too
HUB_ID_PREFIXED_RE = re.compile(rf"^(?P<repo>(?:{_SEGMENT}/)?{_SEGMENT})(?:@(?P<rev>{_REV}))?$")
_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".gguf")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# config and tokenizer files fetched beside the weights (top level of the repository only)
AUX_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_SUFFIXES = (".safetensors.index.json", ".safetensors")
PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline: weights in component folders
SHARD_SUFFIX_RE = re.compile(r"-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """The repository's name part: the default member name."""
        return self.repo.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(arg: str) -> HubId | None:
    """``org/name[@rev]`` or ``hf://[org/]name[@rev]`` -> HubId; anything else -> None.
    Does not look at the disk: callers check first that ``arg`` is not an existing local path."""
    if arg.startswith(HF_PREFIX):
        m = HUB_ID_PREFIXED_RE.match(arg[len(HF_PREFIX) :])
        if not m or ".." in m[0] or "--" in m["repo"]:
            raise InputError(f"{arg}: not a Hub id; expected hf://org/name or hf://org/name@revision")
        return HubId(m["repo"], m["rev"])
    m = HUB_ID_RE.match(arg)
    if not m or ".." in m[0] or "--" in m["repo"]:
        return None
    if m["rev"] is None and m["repo"].lower().endswith(_FILE_SUFFIXES):
        return None  # "dir/model.safetensors" is a (missing) file, not a repository
    return HubId(m["repo"], m["rev"])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }


def cache_dir() -> Path:
    """The Hub cache huggingface_hub would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(os.path.expanduser(xdg)) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def select_files(hub: HubId, files: list[str], index_shards: list[str] | None = None) -> list[str]:
    """Which of a repository's files to fetch: the weights (one file, an index and its shards, or the
    top-level *.safetensors of a multi-component checkpoint; for a diffusers pipeline, with model_index.json,
    the weights of its component folders, without variants such as ``*.fp16.safetensors``) and the config and
    tokenizer files beside them. Raises InputError when there are no usable safetensors weights.

    ``index_shards``: the files that ``model.safetensors.index.json`` names (when the caller has read it):
    only those are fetched with it, not other top-level checkpoints such as a ``consolidated.safetensors``
    copy of the same weights."""
    top = sorted(f for f in files if "/" not in f)
    if SINGLE_NAME in top:
        weights = [SINGLE_NAME]
    elif INDEX_NAME in top and index_shards is not None:
        missing = sorted(set(index_shards) - set(files))
        if missing:
            raise InputError(f"{hub}: {INDEX_NAME} names {missing[0]}, which the repository does not have")
        weights = sorted({INDEX_NAME, *index_shards})
    elif PIPELINE_INDEX in top:
        weights = [
            f
            for f in sorted(files)
            if f.count("/") == 1 and f.endswith(_WEIGHT_SUFFIXES) and "." not in _weight_stem(f.split("/")[1])
        ]
    else:
        weights = [f for f in top if f.endswith(_WEIGHT_SUFFIXES)]
    if not any(f.endswith(".safetensors") for f in weights):
        pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        nested = [f for f in files if f.endswith(".safetensors")]
        if nested:
            why = f"its .safetensors files are in sub-folders ({nested[0]}, ...); download it and pass a local path"
        elif pickles:
            shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
            why = f"only {shown}; convert it to safetensors first (e.g. with the safetensors convert script)"
        else:
            why = "no weights at all"
        raise InputError(f"{hub}: the repository has no .safetensors weights: {why}")
    depth = 1 if PIPELINE_INDEX in top else 0  # a pipeline's folders hold configs (scheduler, tokenizer, ...)
    aux = [f for f in sorted(files) if f.endswith(AUX_SUFFIXES) and f not in weights and f.count("/") <= depth]
    return weights + aux


def index_shards(hub: HubId, raw: bytes) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names (its weight_map's values), sorted."""
    return index_shard_names(raw, f"{hub}: {INDEX_NAME}")


def _weight_stem(name: str) -> str:
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return SHARD_SUFFIX_RE.sub("", name[: -len(suffix)])
    return name


def _local_listing(folder: Path) -> list[str]:
    return sorted(PurePosixPath(p.relative_to(folder).as_posix()).as_posix() for p in folder.rglob("*") if p.is_file())


def resolve(hub: HubId) -> tuple[Path, str]:
    """Fetch (or find in the cache) what wfactor needs of ``hub``; returns (snapshot folder, commit hash)."""
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputError(f"{hub}: reading Hub models needs huggingface_hub (pip install huggingface_hub)") from None
    cache = cache_dir()
    is_offline = offline()
    where = f"the Hugging Face cache {cache}"
    try:
        if is_offline:
            # the documented cache layout: models--org--name/{refs/<branch or tag>, snapshots/<commit>/...}
            storage = cache / ("models--" + hub.repo.replace("/", "--"))
            commit = hub.revision or "main"
            ref = storage / "refs" / commit
            if not re.fullmatch(r"[0-9a-f]{40}", commit) and ref.is_file():
                commit = ref.read_text(encoding="utf-8").strip()
            snap = storage / "snapshots" / commit
            if not snap.is_dir():
                raise hf_errors.LocalEntryNotFoundError(str(snap))
            listing = _local_listing(snap)
            index = snap / INDEX_NAME
            shards = index_shards(hub, index.read_bytes()) if index.is_file() else None
            wanted = select_files(hub, listing, shards)  # a clear error for a repo without safetensors
            # through huggingface_hub as well: it checks the snapshot against its cached file listing
            folder = Path(
                snapshot_download(  # type: ignore[arg-type]
                    hub.repo, revision=commit, cache_dir=cache, local_files_only=True, allow_patterns=wanted
                )
            )
        else:
            info = HfApi().model_info(hub.repo, revision=hub.revision, files_metadata=False)
            listing = [s.rfilename for s in (info.siblings or [])]
            shards = None
            if INDEX_NAME in listing and SINGLE_NAME not in listing:  # fetch the index first: it names the shards
                fetched = hf_hub_download(hub.repo, INDEX_NAME, revision=info.sha, cache_dir=cache)
                shards = index_shards(hub, Path(fetched).read_bytes())
            wanted = select_files(hub, listing, shards)
            folder = Path(
                snapshot_download(hub.repo, revision=info.sha, cache_dir=cache, allow_patterns=wanted)  # type: ignore[arg-type]
            )
    except InputError:
        raise
    except hf_errors.RevisionNotFoundError:
        raise NotFoundError(
            f"{hub}: no such file or directory, and the Hub has no revision {hub.revision!r} of {hub.repo}"
        ) from None
    except hf_errors.GatedRepoError:
        raise InputError(
            f"{hub}: the repository is gated; accept its terms on the Hub and log in (hf auth login)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise NotFoundError(
            f"{hub}: no such file or directory, and no such repository on the Hub "
            "(or it is private: log in with hf auth login)"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        rev = hub.revision or "main"
        if is_offline:
            raise NotFoundError(
                f"{hub}: no such file or directory, and revision {rev!r} of {hub.repo} is not in {where} "
                "while the Hub is offline (HF_HUB_OFFLINE=1); download it once online or unset HF_HUB_OFFLINE"
            ) from None
        raise NotFoundError(
            f"{hub}: no such file or directory; the Hub could not be reached and revision {rev!r} of {hub.repo} "
            f"is not in {where}"
        ) from None
    except hf_errors.HFValidationError as exc:
        raise InputError(f"{hub}: not a valid Hub id ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # the network boundary: HTTP, connection (httpx), disk errors
        first = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise InputError(
            f"{hub}: no such file or directory, and it could not be fetched from the Hugging Face Hub ({first}); "
            "check the name, your connection, or set HF_HUB_OFFLINE=1 to use the local cache"
        ) from None
    return folder, folder.name
