"""The lines that fence lowvram's managed block in webui-user files, and the hook's folder name.

Shared by the writer (apply/webui_user.py), detection (which reads the user's own lines outside
the block) and doctor (which checks the block is still there).
"""

from __future__ import annotations

BLOCK_BEGIN = "# >>> lowvram managed block (`lowvram revert` removes it; edits inside are replaced) >>>"
BLOCK_END = "# <<< lowvram managed block <<<"
# cmd comments: `rem` lines; `::` is unsafe inside parenthesised blocks.
BAT_BLOCK_BEGIN = "rem >>> lowvram managed block (`lowvram revert` removes it; edits inside are replaced) >>>"
BAT_BLOCK_END = "rem <<< lowvram managed block <<<"

HOOK_EXTENSION_DIR = "lowvram-layout"

# Variables the block sets only where nothing before it did (the user's environment or their own
# lines in webui-user): a value of the user's wins (docs/architecture.md#the-policy, "Torch install").
UNSET_ONLY_ENV = ("TORCH_COMMAND",)


def checkpoint_key(name: str, size: int, mtime: float) -> str:
    """How observations name a checkpoint: file name + size + whole-second mtime.

    A1111's sha256 is lazy and off with --no-hashing, so the hook and lowvram both use this.
    """
    return f"{name}|{size}|{int(mtime)}"


def content_key(size: int, digest: str) -> str:
    """How observations name a model file's content across trees: its size and the sha256 of its first bytes
    (world/detect/checkpoint.py's content_key reads them, bounded). A copy elsewhere, with another name or
    mtime, has the same key; the weights themselves are never read."""
    return f"{size}:{digest[:32]}"
