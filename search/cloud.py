"""Copies between this machine and a cloud URI (s3://, gs://, file://...) through pyarrow: the backbone
cache (search/backbone.py) and a search's own files (search/state.py). Each file is one object: a
reader sees all of it or the previous one."""
import uuid
from pathlib import Path

from drn.checkpoint import temp_beside


def fetch(uri: str, path: Path) -> bool:
    """Copy the object at `uri` to `path` (atomically); False when there is none."""
    from pyarrow import fs
    filesystem, where = fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(where).type != fs.FileType.File:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with filesystem.open_input_stream(where) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def publish(folder: str, paths: list[Path], names: list[str] | None = None) -> None:
    """Upload each of `paths` to `folder`/<its name, or `names`'> (the folder's filesystem resolved
    once). An object store's put is whole; on a file system (file://) each file is written under a
    name of its own and renamed into place, so a reader never sees half of it."""
    from pyarrow import fs
    filesystem, where = fs.FileSystem.from_uri(folder)
    filesystem.create_dir(where, recursive=True)
    local = isinstance(filesystem, fs.LocalFileSystem)
    for path, name in zip(paths, names or [p.name for p in paths]):
        dest = f"{where}/{name}"
        tmp = f"{where}/.{name}.{uuid.uuid4().hex}.part" if local else dest
        with filesystem.open_output_stream(tmp) as dst:
            dst.write(path.read_bytes())
        if local:
            filesystem.move(tmp, dest)


def remove(uri: str) -> None:
    """Delete the object at `uri` (none there: nothing to do)."""
    from pyarrow import fs
    filesystem, where = fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(where).type == fs.FileType.File:
        filesystem.delete_file(where)
