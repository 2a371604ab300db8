"""An OpenAI-compatible HTTP server over an engine (`Engine`, or `OnnxEngine` for an exported
folder): POST /v1/chat/completions (plain or SSE streaming), GET /v1/models and GET /health.

Images arrive as `image_url` content parts holding base64 `data:` URLs (local file paths only when
allowed; http(s) URLs are never fetched). Every bad request - oversized or corrupt image, bad
base64, unknown content part, too many images, max_tokens too large, context overflow, malformed
or oversized body, missing API key - gets a 4xx with an OpenAI-style body {"error": {"message",
"type", "param", "code"}}, a full queue a 503, and the server keeps serving.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import time
import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from ..data.images import MAX_PIXELS, ImageError, data_url_payload, decode_base64, is_data_url, load_image
from ..data.records import IMAGE_PLACEHOLDER
from ..deploy import activations as activations_setting
from .engine import ContextOverflow, Engine, EngineBusy
from .guards import Guard, error_response

MAX_IMAGE_BYTES = 10 * 2**20
MAX_BODY_BYTES = 32 * 2**20
MAX_IMAGES = 8
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses, rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *details, **options):
        """The arguments of `guards.error_response`: status, message, param, code, type, headers."""
        super().__init__(message)
        self.arguments = (status, message, *details), options

    def response(self) -> JSONResponse:
        args, options = self.arguments
        return error_response(*args, **options)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are ignored
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class ImageReader:
    """Turns an `image_url` into a decoded image within the byte and pixel limits."""

    def __init__(self, allow_local: bool, max_bytes: int, max_pixels: int):
        self.allow_local, self.max_bytes, self.max_pixels = allow_local, max_bytes, max_pixels

    def __call__(self, url: str, param: str):
        try:
            return load_image(self._bytes(url, param), self.max_pixels)
        except ImageError as err:
            raise APIError(400, f"unusable image: {err}", param, "invalid_image") from err

    def _too_large(self, size: int, param: str) -> APIError:
        return APIError(413, f"image is {size} bytes, over the limit of {self.max_bytes}", param, "image_too_large")

    def _bytes(self, url: str, param: str) -> bytes:
        if is_data_url(url):
            try:
                payload = data_url_payload(url)
            except ValueError as err:
                raise APIError(400, str(err), param, "invalid_image_url") from err
            if len(payload) * 3 // 4 > self.max_bytes:
                raise self._too_large(len(payload) * 3 // 4, param)
            try:
                return decode_base64(payload)
            except ValueError as err:
                raise APIError(400, f"image data is {err}", param, "invalid_base64") from err
        if url.split(":", 1)[0].lower() in ("http", "https"):
            raise APIError(
                400,
                "remote image URLs are never fetched; send the image inline as a base64 data: URL",
                param,
                "invalid_image_url",
            )
        if not self.allow_local:
            raise APIError(
                400,
                "local image paths are disabled (start the server with --allow-local-images); "
                "send the image as a base64 data: URL",
                param,
                "invalid_image_url",
            )
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise APIError(400, f"image file not found: {path}", param, "invalid_image_url")
        if path.stat().st_size > self.max_bytes:
            raise self._too_large(path.stat().st_size, param)
        return path.read_bytes()


def _image_parts(messages: list[Message]) -> int:
    return sum(isinstance(m.content, list) and sum(p.get("type") == "image_url" for p in m.content) for m in messages)


def _conversation(messages: list[Message], read_image: ImageReader, max_images: int) -> tuple[list[dict], list]:
    """OpenAI messages -> processor messages (an `<image>` where each image part was) + images."""
    if (n := _image_parts(messages)) > max_images:
        raise APIError(
            400,
            f"the request has {n} images, over this server's limit of {max_images} (genieblue serve --max-images)",
            "messages",
            "too_many_images",
        )
    out, images = [], []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise APIError(
                400, f"role {message.role!r} is not supported; use one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
        parts = (
            [{"type": "text", "text": message.content or ""}]
            if not isinstance(message.content, list)
            else message.content
        )
        text = []
        for j, part in enumerate(parts):
            param = f"messages[{i}].content[{j}]"
            if part.get("type") == "text":
                text.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise APIError(
                        400, "an image_url part needs {'image_url': {'url': ...}}", param, "invalid_image_url"
                    )
                images.append(read_image(url, param))
                text.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise APIError(
                    400,
                    f"content part type {part.get('type')!r} is not supported; use 'text' or 'image_url'",
                    f"{param}.type",
                    "unsupported_content_type",
                )
        out.append({"role": message.role, "content": "".join(text)})
    return out, images


def create_app(
    engine: Engine,
    model_name: str = "genieblue",
    allow_local_images: bool = False,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_PIXELS,
    max_tokens_limit: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_images: int = MAX_IMAGES,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app. `max_tokens_limit` caps max_tokens per request (default: the context);
    with an `api_key` every /v1 route needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="GenieBlue", version="1")
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    read_image = ImageReader(allow_local_images, max_image_bytes, max_image_pixels)
    limit = max_tokens_limit or engine.context_length
    created = int(time.time())

    @app.exception_handler(APIError)
    def api_error(_, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    def invalid_body(_, err: RequestValidationError):
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first['msg']}").response()
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return APIError(400, f"invalid request: {param}: {first['msg']}", param or None).response()

    @app.exception_handler(HTTPException)
    def http_error(_, err: HTTPException):
        return APIError(err.status_code, str(err.detail), type="invalid_request_error").response()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "genieblue"}],
        }

    @app.post("/v1/chat/completions")
    def chat_completions(body: ChatRequest):
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        max_tokens = next(
            (m for m in (body.max_completion_tokens, body.max_tokens) if m is not None), DEFAULT_MAX_TOKENS
        )
        if max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {limit}",
                "max_tokens",
                "max_tokens_too_large",
            )
        messages, images = _conversation(body.messages, read_image, max_images)
        try:
            request = engine.submit(
                messages, images, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop
            )
        except EngineBusy as err:
            raise APIError(503, str(err), code="queue_full", type="server_error", headers={"retry-after": "1"}) from err
        except ContextOverflow as err:
            raise APIError(400, str(err), "messages", "context_length_exceeded") from err
        except ValueError as err:  # ImageError included
            raise APIError(400, str(err)) from err
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or model_name}
        if body.stream:
            return StreamingResponse(_sse(request, reply), media_type="text/event-stream")
        try:
            done = request.result()
        except RuntimeError as err:
            raise APIError(500, str(err), type="server_error") from err
        return {
            **reply,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
        }

    return app


def _sse(request, reply: dict):
    """Server-sent events: a role chunk, one chunk per text delta, a finish chunk, then [DONE]."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        body = {
            **reply,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        for delta in request.stream():
            yield chunk({"content": delta})
        yield chunk({}, request.finish_reason)
    except RuntimeError as err:
        error = {"message": str(err), "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        request.cancel()  # a client that went away stops its row
    yield "data: [DONE]\n\n"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _check_address(host: str, port: int) -> None:
    """Refuse, before a model loads for minutes, an address this process cannot listen on (a port in
    use or out of range, a host that is not this machine's): bound once here as uvicorn binds it."""
    if not 0 <= port <= 65535:  # (getaddrinfo would take it modulo 65536)
        raise ValueError(f"port {port} is out of range: use 0-65535 (0: any free one)")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except (OSError, OverflowError) as err:
        raise ValueError(f"cannot listen on {host}:{port} ({err}): choose another --host or --port") from None


def serve(
    model_dir: str | None = None,
    *,
    onnx: str | None = None,
    threads: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    allow_local_images: bool = False,
    llm: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_images: int = MAX_IMAGES,
    max_queue: int = Engine.MAX_QUEUE,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Load a saved model (`model_dir`, on `device` in `dtype`) or an exported folder (`onnx`, under
    onnxruntime with `threads`) and serve it until interrupted (a warning first when `host` reaches
    beyond this machine and no `api_key` protects it). Raises ValueError for options that do not go
    together, and what loading the model raises."""
    import uvicorn

    if model_dir is not None and onnx is not None:
        raise ValueError("give -m/--model or --onnx, not both")
    if model_dir is None and onnx is None:
        raise ValueError("give -m/--model (a saved model folder) or --onnx (a folder written by genieblue export)")
    if onnx is not None and llm is not None:
        raise ValueError("an exported folder holds its base already; --llm applies to a saved model folder only")
    if onnx is None and threads is not None:
        raise ValueError("--threads sets onnxruntime's threads and applies to --onnx only")
    if onnx is not None and (device is not None or dtype is not None):
        raise ValueError("--device / --dtype place a saved model (-m); an --onnx folder runs under onnxruntime")
    _check_address(host, port)
    if not api_key and not is_loopback(host):
        print(
            f"warning: serving on {host} without an API key: anyone who can reach port {port} can use the model; "
            "pass --api-key or set GENIEBLUE_API_KEY",
            file=sys.stderr,
        )
    if onnx is not None:
        from .onnx_engine import OnnxEngine

        engine = OnnxEngine.load(onnx, threads, max_queue=max_queue, share=True)
        if activations_setting.of(engine.deployed.manifest) != activations_setting.DEFAULT:
            print(
                f"note: {onnx} was exported with {engine.deployed.manifest['activations']} activations: "
                "text-mode replies are close to the quantised base's, not exactly its own",
                file=sys.stderr,
            )
    else:
        engine = Engine.load(model_dir, llm=llm, device=device, dtype=dtype, max_queue=max_queue)
    app = create_app(
        engine,
        model_name=Path(onnx or model_dir).resolve().name,
        allow_local_images=allow_local_images,
        max_body_bytes=max_body_bytes,
        max_images=max_images,
        api_key=api_key,
    )
    uvicorn.run(app, host=host, port=port)
