"""Hub access: the token, who may write where, and the single-commit push.

The token is passed to huggingface_hub and nowhere else: never printed, logged or written to disk by us.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import retry
from .errors import AuthError, BadOptionError, HubUnreachableError, PushError, first_line
from .source import REPO_ID, TransportError, same_as_hub, unreachable


# A token value of False means "anonymous": huggingface_hub then sends none, not even the machine's own.
Token = str | bool | None


def resolve_token(token: Token = None) -> Token:
    """An explicit token; False stays anonymous (a Space visitor without a sign-in); else HF_TOKEN, else the one
    saved by `hf auth login`."""
    if token or token is False:
        return token
    from huggingface_hub import get_token

    return get_token()


def whoami(token: str | None) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if not token:
        raise AuthError("Pushing needs a Hub token: set HF_TOKEN or run `hf auth login` (write access).")
    try:
        return HfApi().whoami(token=token)
    except OfflineModeIsEnabled:
        raise HubUnreachableError("Pushing needs the Hub and HF_HUB_OFFLINE=1 is set; unset it, or leave out the "
                                  "push target.") from None
    except TransportError as exc:
        raise unreachable(exc) from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise AuthError("The Hub token was rejected; create a new one with write access.") from None
        raise AuthError(f"Could not check the token with the Hub: {str(exc).splitlines()[0]}") from None


def writable_namespaces(me: dict[str, Any]) -> set[str]:
    names = {me["name"]}
    for org in me.get("orgs") or []:
        # Read-only members cannot push; tokens that do not report a role are left for the Hub to judge.
        if org.get("roleInOrg") in (None, "admin", "write", "contributor"):
            names.add(org["name"])
    return names


def check_target(repo_id: str, token: str | None) -> str:
    """Validate a push target before any work; returns the namespace. Raises AuthError/BadOptionError."""
    if "/" not in repo_id or not REPO_ID.match(repo_id):
        raise BadOptionError(f"'{repo_id}' is not a valid target repo id; use owner/name.")
    me = whoami(token)
    namespace = repo_id.split("/")[0]
    allowed = writable_namespaces(me)
    if namespace not in allowed:
        raise AuthError(
            f"This token ({me['name']}) cannot write to '{namespace}'; push to one of: {', '.join(sorted(allowed))}."
        )
    return namespace


def push_folder(folder: Path, files: list[str], repo_id: str, token: str, private: bool,
                message: str) -> str:
    """Upload `files` (relative to folder) in one commit; a repo created here is removed again on failure.

    A busy Hub (429/5xx) or a dropped connection is retried with backoff. The commit names its parent, so a
    repeat can never land twice; and when a commit's answer is lost, the repo's head tells whether it landed.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    created = False
    try:
        if not retry.call(lambda: api.repo_exists(repo_id, token=token)):
            retry.call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, token=token))
            created = True
        return _commit(api, folder, files, repo_id, token, message)
    except (HfHubHTTPError, TransportError, OSError, ValueError) as exc:
        if created:
            try:
                retry.call(lambda: api.delete_repo(repo_id, token=token))
            except (HfHubHTTPError, TransportError):
                pass
        raise PushError(f"Upload to {repo_id} failed, nothing was committed: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    status = retry.status_of(exc)
    if isinstance(exc, TransportError):
        return f"the connection to the Hub broke ({type(exc).__name__}); try again later."
    if status in retry.TRANSIENT_STATUS:
        return f"the Hub kept answering HTTP {status} after {retry.ATTEMPTS} tries; try again later."
    return first_line(exc)


def _commit(api: Any, folder: Path, files: list[str], repo_id: str, token: str, message: str) -> str:
    from huggingface_hub import CommitOperationAdd

    parent = retry.call(lambda: api.repo_info(repo_id, token=token).sha)
    for attempt in range(retry.ATTEMPTS):
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        try:
            # parent_commit: should an earlier try have landed unseen, this one is refused, not a 2nd commit.
            return str(api.create_commit(repo_id, operations=ops, commit_message=message, token=token,
                                         parent_commit=parent).commit_url)
        except Exception as exc:
            if not retry.transient(exc):
                raise
            head = retry.call(lambda: api.model_info(repo_id, files_metadata=True, token=token))
            if head.sha != parent and _holds(head, folder, files):
                return f"{repo_url(repo_id)}/commit/{head.sha}"   # it landed; only the answer was lost
            if head.sha != parent:
                raise PushError(f"{repo_id} changed on the Hub during the upload (someone else committed); "
                                "nothing of this run was committed; try again.") from None
            if attempt + 1 >= retry.ATTEMPTS:
                raise
            retry.sleep(retry.wait_before(attempt, exc))
    raise AssertionError("unreachable")


def _holds(info: Any, folder: Path, files: list[str]) -> bool:
    """Whether the repo at `info` has exactly our files (by size and hash)."""
    remote = {s.rfilename: s for s in info.siblings or []}
    for name in files:
        sibling = remote.get(name)
        sha256 = sibling.lfs.sha256 if sibling is not None and sibling.lfs else None
        if sibling is None or sibling.size is None or not (sha256 or sibling.blob_id):
            return False   # nothing to compare with: not known to be ours
        if not same_as_hub(folder / name, sibling.size, sha256, sibling.blob_id):
            return False
    return True


def repo_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
