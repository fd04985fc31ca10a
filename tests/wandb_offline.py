"""Test helper: what an offline W&B run wrote, read back from its ``run-<id>.wandb`` file.

wandb 0.31 writes an offline run's summary, config, name and tags only into that file (no wandb-summary.json), and
wandb.Api needs a server, so the file is read here: W&B's LevelDB-style log (a 7-byte header ``:W&B`` + magic +
version, then 32 KiB blocks of records, each a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of
``wandb_internal_pb2.Record`` protobufs."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if pos + HEADER + length > len(data):  # a record still being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    folder: Path
    name: str = ""
    tags: list[str] = field(default_factory=list)
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # flat keys; nested ones joined with "/"
    artifact_files: dict = field(default_factory=dict)  # artifact name -> {path in the artifact: local file}

    def table(self, key: str) -> dict:
        """A logged ``wandb.Table`` as W&B wrote it, media included (the staged copy in its run_table artifact)."""
        files = self.artifact_files[next(n for n in self.artifact_files if n.endswith(f"-{key}"))]
        return {"json": json.loads(Path(files[f"{key}.table.json"]).read_text()), "files": files}


def finished_records(folder: Path, timeout_s: float = 30.0) -> list:
    """The records of a run that has finished: W&B's service may still be writing the file when ``run.finish()``
    returns in this process, so wait for its exit record."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(Path(folder).glob("run-*.wandb"))
        found = records(files[0]) if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def read_run(folder: Path) -> OfflineRun:
    run = OfflineRun(Path(folder))
    for record in finished_records(folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.tags, run.group, run.job_type = r.display_name, list(r.tags), r.run_group, r.job_type
            run.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            run.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "summary":
            for u in record.summary.update:
                run.summary["/".join(u.nested_key) if u.nested_key else u.key] = json.loads(u.value_json)
        elif kind == "artifact":
            run.artifact_files[record.artifact.name] = {c.path: c.local_path for c in record.artifact.manifest.contents}
    return run


def runs_of(run_dir: Path) -> dict[str, list[OfflineRun]]:
    """A run folder's offline W&B runs by job type (the stage), oldest first."""
    out: dict[str, list[OfflineRun]] = {}
    for folder in sorted((Path(run_dir) / "wandb").glob("offline-run-*")):
        run = read_run(folder)
        out.setdefault(run.job_type, []).append(run)
    return out
