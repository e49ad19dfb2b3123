"""`AtomicCheckpointIO`: Lightning's checkpoint plugin, with crash-safe writes and pickle-free reads.

Lightning's `TorchCheckpointIO` stages a save in the system temp folder and moves it into place,
which is a copy (not an atomic rename) when that folder is on another file system, and it does not
fsync. A job killed during such a save can leave a truncated `last.ckpt`. This plugin writes a
temporary file next to the target, fsyncs it and `os.replace`s it, so a kill at any moment leaves
either the previous checkpoint or the new one. It reads local files with
`arzoo.checkpoint_io.read_checkpoint` (`weights_only=True`, clear errors for corrupt or unsafe
files). `arzoo fit` uses it unless another CheckpointIO plugin is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from arzoo.checkpoint_io import atomic_torch_save, read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic and whose loads never unpickle code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write `checkpoint` to `path` atomically (remote paths: Lightning's own transaction)."""
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a checkpoint with `weights_only=True` whatever the caller asks (see module docstring)."""
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # Lightning moves model and optimizer state to the right device after loading
        return read_checkpoint(path, "checkpoint")
