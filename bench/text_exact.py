"""Is a saved model's text path its base's own on this device and dtype? Loads the model as `chat`,
`serve` and `eval` do, and the base on its own through transformers, alike, then compares:

  * logits on a few prompts (`torch.equal`),
  * `ChatSession`'s reply against the base's greedy reply to its own chat template,
  * the static-cache decoder's tokens (each mode given) against the base decoded by the same loop.

    python bench/text_exact.py MODEL_DIR [--device cuda] [--dtype bfloat16] [--modes eager,graph] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch
from prompts import QUESTIONS
from transformers import AutoModelForCausalLM

from genieblue.data import collate_prompts
from genieblue.infer.chat import ChatSession
from genieblue.infer.decode import StaticDecoder
from genieblue.model.placement import resolve_placement
from genieblue.model.sources import resolve_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--modes", default="eager", help="static-decoder modes to compare (eager, graph, compile)")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device, dtype = resolve_placement(args.device, args.dtype)

    session = ChatSession.load(args.model, device=device, dtype=dtype, max_new_tokens=args.tokens)
    model, processor = session.model, session.processor
    base = AutoModelForCausalLM.from_pretrained(resolve_llm(model.base_spec), dtype=dtype, device_map=device).eval()
    tok = processor.tokenizer
    prompts = [
        torch.tensor(
            [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)]
        )
        for q in QUESTIONS
    ]
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "prompts": len(prompts)}
    with torch.no_grad():
        result["logits_equal"] = sum(torch.equal(model(p).logits, base(input_ids=p.to(device)).logits) for p in prompts)
        replies = []
        for question, prompt in zip(QUESTIONS, prompts):
            session.history = []
            new = base.generate(
                input_ids=prompt.to(device), do_sample=False, max_new_tokens=args.tokens, pad_token_id=processor.pad_id
            )[0, prompt.shape[1] :]
            replies.append(session.ask(question) == tok.decode(new, skip_special_tokens=True).strip())
        result["chat_replies_equal"] = sum(replies)
        batch = collate_prompts([(p, None) for p in prompts], processor.pad_id)
        for mode in args.modes.split(","):
            ours = StaticDecoder(model, mode).generate(**batch, max_new_tokens=args.tokens)
            theirs = StaticDecoder(base, mode).generate(**batch, max_new_tokens=args.tokens)
            result[f"static_{mode}_tokens_equal"] = bool(torch.equal(ours, theirs))
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
