"""Copies between this machine and a cloud URI (s3://, gs://, file://...) through pyarrow: the backbone
cache (search/backbone.py) and a search's own files (search/state.py). Each file is one object: a
reader sees all of it or the previous one."""
from pathlib import Path


def fetch(uri: str, path: Path) -> bool:
    """Copy the object at `uri` to `path` (atomically); False when there is none."""
    from pyarrow import fs
    filesystem, where = fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(where).type != fs.FileType.File:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with filesystem.open_input_stream(where) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    tmp.replace(path)
    return True


def publish(folder: str, paths: list[Path]) -> None:
    """Upload each of `paths` to `folder`/<its name> (the folder's filesystem resolved once)."""
    from pyarrow import fs
    filesystem, where = fs.FileSystem.from_uri(folder)
    filesystem.create_dir(where, recursive=True)
    for path in paths:
        with filesystem.open_output_stream(f"{where}/{path.name}") as dst:
            dst.write(path.read_bytes())
