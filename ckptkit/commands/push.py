"""``ckptkit push``: upload a Hugging Face model folder to the Hub (over ``ckptkit.hub.push_folder``)."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .shell import emit_json, handle_errors, hub_progress_bars, json_option, stdout


@click.command("push")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="OWNER/NAME")
@click.option("--private", is_flag=True,
              help="Create the repository private (and refuse to push to an existing public one).")
@click.option("--revision", metavar="BRANCH", help="Branch to commit to; created from main if it does not exist.")
@click.option("--commit-message", help="Commit message (default: 'Upload DIR with ckptkit VERSION').")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@json_option()
@handle_errors
def push(folder, repo_id, private, revision, commit_message, create_pr, as_json):
    """Upload a Hugging Face model folder (config.json and weights) to the Hub.

    The repository is created if it is missing. The token comes from HF_TOKEN or from
    `hf auth login`; HF_ENDPOINT points ckptkit at another Hub.

    \b
    Example:
      ckptkit push gpt2-hf/ my-org/gpt2-converted --private
      ckptkit push gpt2-hf/ my-org/gpt2-converted --revision iter-10 --json
    """
    from ..hub import push_folder

    with hub_progress_bars(enabled=not as_json):
        result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                             create_pr=create_pr)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title=f"{folder} -> {result.repo_id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    table.add_row("repository", f"{result.endpoint}/{result.repo_id}")
    table.add_row("revision", result.revision)
    table.add_row("commit", result.commit_url)
    if result.pr_url:
        table.add_row("pull request", result.pr_url)
    table.add_row("files", f"{len(result.files)} ({result.total_bytes / 1e6:.1f} MB)")
    stdout.print(table)


COMMANDS = (push,)
