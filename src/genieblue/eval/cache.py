"""The resume cache every eval shares: each finished item is appended to a JSONL file as one line
{"model", "path", "settings", "id", "result"}, so a rerun of an interrupted eval skips what is done.
A row counts only for the same model, text path and settings (device, dtype, base, reply length:
what shapes a result), so a rerun with other settings computes afresh. A line cut short by a kill
is ignored (and the next append starts on a fresh line)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ResultCache:
    """Finished items of one (model, path, settings), read from and appended to `file`. `settings`
    values are compared as strings (a torch dtype as its name)."""

    def __init__(self, file: str | os.PathLike, model: str, path: str, settings: dict | None = None):
        self.file, self.model, self.path = Path(file), str(model), path
        self.settings = {k: str(v).removeprefix("torch.") for k, v in sorted((settings or {}).items())}
        self._done: dict[str, object] = {}
        if not self.file.is_file():
            return
        text = self.file.read_text(encoding="utf-8")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("model") == self.model and row.get("path") == path and row.get("settings", {}) == self.settings:
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
        row = {"model": self.model, "path": self.path, "settings": self.settings, "id": item_id, "result": result}
        line = json.dumps(row)
        with self.file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __len__(self) -> int:
        return len(self._done)
