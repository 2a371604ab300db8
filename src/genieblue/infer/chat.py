"""Chat with a saved GenieBlue model: one-shot questions or an interactive rich terminal session,
with an optional image. Text-only turns take the non-shared base path."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.prompt import Prompt

from ..loading import load_model_and_processor
from ..model import GenieBlueForConditionalGeneration
from .engine import check_context


class ChatSession:
    """A conversation with one model: `ask` adds a turn and returns the greedy reply."""

    def __init__(
        self, model: GenieBlueForConditionalGeneration, processor, max_new_tokens: int = 128, shared_base: bool = False
    ):
        self.model, self.processor = model.eval(), processor
        self.max_new_tokens, self.shared_base = max_new_tokens, shared_base
        self.history: list[dict] = []
        self.images: list = []

    @classmethod
    def load(cls, model_dir: str | Path, llm: str | None = None, device=None, dtype=None, **kwargs) -> ChatSession:
        """A session over a saved model on `device` in `dtype` (default: a GPU in bfloat16 when there
        is one, else the CPU in float32); `kwargs`: max_new_tokens, shared_base. Raises what
        `GenieBlueForConditionalGeneration.from_pretrained` raises."""
        return cls(*load_model_and_processor(model_dir, llm, device, dtype), **kwargs)

    def ask(self, text: str, image: str | Path | None = None) -> str:
        """Add a user turn (with an image) and return the greedy reply, kept in the history.

        Raises:
            ImageError: an image that cannot be read; ContextOverflow: the conversation and a reply of
            `max_new_tokens` do not fit the model's context. Either way the session is as it was."""
        turn = {"role": "user", "content": text if image is None else f"<image>\n{text}"}
        images = self.images if image is None else [*self.images, str(image)]
        ids, pixels = self.processor.prompt([*self.history, turn], images)
        check_context(
            ids.shape[1], self.max_new_tokens, self.model.llm.config.max_position_embeddings, "max_new_tokens"
        )
        self.history.append(turn)
        self.images = images
        new = self.model.generate(
            ids,
            pixel_values=pixels,
            shared_base=self.shared_base,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.processor.pad_id,
        )
        reply = self.processor.tokenizer.decode(new[0], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def interactive(self, console: Console, image: str | Path | None = None) -> None:
        console.print("[bold]genieblue chat[/bold] · /image PATH attaches an image · /reset · /quit")
        while True:
            text = Prompt.ask("[cyan]you[/cyan]", console=console).strip()
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                self.history, self.images, image = [], [], None
                continue
            if text.startswith("/image "):
                image = text.split(" ", 1)[1].strip()
                continue
            try:
                with console.status("thinking"):
                    reply = self.ask(text, image)
            except ValueError as err:  # an unreadable image, a conversation over the context: the session goes on
                console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
                continue
            finally:
                image = None
            console.print(f"[green]genieblue[/green] {reply}")
