"""Publishing a converted model folder to the Hugging Face Hub.

``push_folder`` checks that the folder is a complete Hugging Face model, creates the repository if it
is missing (and the branch, when a revision is named), then uploads the folder with one
``HfApi.upload_folder`` call. How each file travels (inline in the commit, Git LFS, or Xet storage) is
huggingface_hub's decision, as is where the token comes from: the ``token`` argument, else ``HF_TOKEN``,
else the login stored by ``hf auth login``. The token is only ever handed to huggingface_hub, which
sends it in the ``Authorization`` header; ckptkit never prints or logs it.

Every failure (no token, a rejected token, a missing repository, an unreachable Hub) becomes a
``BadInput`` with one line that says what went wrong::

    >>> push_folder("gpt2-hf", "my-org/gpt2-converted", private=True)  # doctest: +SKIP
    PushResult(repo_id='my-org/gpt2-converted', revision='main', commit_oid='4f1c...', ...)
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .errors import BadInput

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class PushResult:
    """What one push did: where it went, the commit it made, and the files it sent."""

    repo_id: str
    revision: str  # the branch written to, or "refs/pr/N" for a pull request
    commit_oid: str
    commit_url: str
    endpoint: str
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)  # paths relative to the folder, sorted
    total_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_folder(folder: str | Path) -> Path:
    """Refuse a folder that is not a complete Hugging Face model; return it as a ``Path``.

    Complete means: ``config.json`` is there, and the weights are too: either a single
    ``model.safetensors`` / ``pytorch_model.bin``, or an index whose every shard is present.

        >>> check_model_folder("gpt2-hf")  # doctest: +SKIP
        PosixPath('gpt2-hf')
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a folder (expected a Hugging Face model folder with config.json)")
    if not (folder / "config.json").is_file():
        raise BadInput(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    indexes = [folder / name for name in INDEX_FILES if (folder / name).is_file()]
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadInput(f"{index}: not a valid index (expected a JSON object with a weight_map): "
                           f"{type(error).__name__}") from None
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise BadInput(f"{index} names {len(missing)} shard(s) that are missing: {', '.join(missing)}")
    if not indexes and not any((folder / name).is_file() for name in SINGLE_WEIGHT_FILES):
        raise BadInput(f"{folder}: no weights (expected {', '.join(SINGLE_WEIGHT_FILES)} or "
                       f"{', '.join(INDEX_FILES)})")
    return folder


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, endpoint: str | None = None,
                create_pr: bool = False) -> PushResult:
    """Upload a Hugging Face model folder to ``repo_id`` on the Hub, creating the repository if needed.

    ``private`` makes a new repository private, and refuses (before uploading anything) to push to an
    existing public one. ``revision`` names the branch to commit to; it is created from ``main`` if it
    does not exist. ``create_pr`` opens a pull request against ``main`` instead of committing to it.
    ``endpoint`` overrides ``HF_ENDPOINT`` (default https://huggingface.co).

        >>> result = push_folder("gpt2-hf", "my-org/gpt2-converted", revision="megatron-iter-10")  # doctest: +SKIP
        >>> result.revision, len(result.files)  # doctest: +SKIP
        ('megatron-iter-10', 4)
    """
    from huggingface_hub import HfApi, constants

    folder = check_model_folder(folder)
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise BadInput(f"a pull request is always opened against main; it cannot go to revision {revision!r} "
                       "(drop the revision, or drop create_pr)")
    # huggingface_hub reads HF_ENDPOINT once, when it is imported (constants.ENDPOINT); reading it
    # again here lets a process that sets it later (a launcher, a test) still be obeyed.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    resolved_token = _resolve_token(token)
    files = _files_to_upload(folder)
    commit_message = commit_message or f"Upload {folder.resolve().name} with ckptkit {__version__}"
    api = HfApi(endpoint=endpoint, token=token, library_name="ckptkit", library_version=__version__)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise BadInput(f"{repo_id} already exists and is public, so it cannot be pushed as private; "
                           "nothing was uploaded")
        if revision not in (None, "main") and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                   commit_message=commit_message)
    except BadInput:
        raise
    except Exception as error:
        message = _explain(error, repo_id=repo_id, revision=revision, endpoint=endpoint)
        if message is None:
            raise
        raise BadInput(_redact(message, resolved_token)) from None
    return PushResult(
        repo_id=repo_id, revision=commit.pr_revision if create_pr else (revision or "main"),
        commit_oid=commit.oid, commit_url=commit.commit_url, endpoint=endpoint, pr_url=commit.pr_url,
        files=files, total_bytes=sum((folder / name).stat().st_size for name in files))


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    owner, _, name = repo_id.partition("/")
    if not owner or not name or "/" in name:
        raise BadInput(f"repository id {repo_id!r}: expected OWNER/NAME, e.g. my-org/gpt2-converted")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadInput(f"repository id {repo_id!r}: {_one_line(str(error))}") from None


def _resolve_token(token: str | None) -> str:
    """The token huggingface_hub will send: ``token``, else HF_TOKEN, else the stored login."""
    from huggingface_hub import get_token

    if token:
        return token
    try:
        resolved = get_token()
    except Exception as error:  # HF_OIDC_RESOURCE is set and the token exchange failed
        raise BadInput(f"could not obtain a Hugging Face token: {_one_line(str(error))}") from None
    if not resolved:
        raise BadInput("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write access)")
    return resolved


def _files_to_upload(folder: Path) -> list[str]:
    """The files ``upload_folder`` sends: everything but .git/ and huggingface_hub's own cache."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    relative_paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(relative_paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP library huggingface_hub uses (it changed across versions)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                   ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _explain(error: BaseException, *, repo_id: str, revision: str | None, endpoint: str) -> str | None:
    """One line for a failure of the Hub client, or None if it is not one we can explain."""
    from huggingface_hub.errors import (HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    # LFS uploads run in worker threads and come back wrapped ("Error while uploading 'x' to the Hub.").
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, (HfHubHTTPError, *_transport_errors())):
        cause = cause.__cause__
    if isinstance(cause, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be pushed (unset it to publish)"
    if isinstance(cause, LocalTokenNotFoundError):
        return "no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write access)"
    if isinstance(cause, RevisionNotFoundError):
        return f"{repo_id}: revision {revision or 'main'!r} not found at {endpoint}"
    if isinstance(cause, RepositoryNotFoundError) and cause.response.status_code != 401:
        return f"{repo_id}: repository not found at {endpoint}, or the token cannot see it"
    if isinstance(cause, HfHubHTTPError):
        status = cause.response.status_code
        detail = f": {_one_line(cause.server_message)}" if cause.server_message else ""
        if status == 401:
            return (f"the Hub at {endpoint} rejected the token (401 Unauthorized{detail}); "
                    "check HF_TOKEN or run `hf auth login`")
        if status == 403:
            return (f"the token may not write to {repo_id} (403 Forbidden{detail}); "
                    f"use a token with write access to {repo_id.split('/')[0]!r}")
        request = cause.response.request
        return f"the Hub at {endpoint} answered {status} to {request.method} {request.url.path}{detail}"
    if isinstance(cause, _transport_errors()):
        return f"cannot reach the Hub at {endpoint}: {type(cause).__name__}: {_one_line(str(cause))}"
    if isinstance(error, ValueError):  # huggingface_hub's checks, e.g. invalid README.md metadata
        return f"{repo_id}: {_one_line(str(error))}"
    return None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _redact(message: str, token: str) -> str:
    return message.replace(token, "<token>") if token else message
