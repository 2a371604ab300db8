"""The resume cache every eval shares: each finished item is appended to a JSONL file as one line
{"model", "path", "id", "result"}, so a rerun of an interrupted eval skips what is done. A line cut
short by a kill is ignored (and the next append starts on a fresh line)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultCache:
    """Finished items of one (model, path) pair, read from and appended to `file`."""

    def __init__(self, file: str | os.PathLike, model: str, path: str):
        self.file, self.model, self.path = Path(file), str(model), path
        self._done: dict[str, object] = {}
        if not self.file.is_file():
            return
        text = self.file.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("model") == self.model and row.get("path") == path:
                self._done[row["id"]] = row["result"]
        if text and not text.endswith("\n"):
            with self.file.open("a", encoding="utf-8") as f:
                f.write("\n")

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._done

    def __getitem__(self, item_id: str):
        return self._done[item_id]

    def __setitem__(self, item_id: str, result) -> None:
        """Record a finished item (appended and flushed at once)."""
        self._done[item_id] = result
        self.file.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"model": self.model, "path": self.path, "id": item_id, "result": result})
        with self.file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __len__(self) -> int:
        return len(self._done)
