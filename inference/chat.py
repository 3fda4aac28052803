"""Generate from, or chat with, a trained coati model in the terminal, with tokens streamed as they come.

    python inference/chat.py MODEL_PATH --prompt "Explain PPO in one sentence."      # one answer, then exit
    python inference/chat.py MODEL_PATH [--quant 4bit] [--system "You are ..."]      # interactive session
    python inference/chat.py --model_path MODEL --input_txt "..." --do_sample --temperature 0.3 --top_k 50 \
        --top_p 0.95 --max_new_tokens 512 --device cuda                            # Colossal-LLaMA's flags

Prompts are rendered with the same template as training (--prompt_template, default auto: the tokenizer's
chat template if it has one, else Alpaca). In a session the whole conversation is sent each turn;
`/reset` clears it, `/exit` (or end of input) quits. Temperature 0 gives greedy decoding.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, TextIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from coati.inference.generation import Generator, SamplingParams, encode_chat  # noqa: E402
from coati.inference.loading import (add_model_args, add_sampling_args, load_from_args,  # noqa: E402
                                     model_path_from_args)
from coati import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, path_flag=True)
    p.add_argument("--prompt", "--input_txt", dest="prompt", default=None,
                   help="answer this one prompt and exit (else: interactive)")
    p.add_argument("--do_sample", action=cli.BoolFlag, default=True,
                   help="sample with --temperature / --top_k / --top_p; false = greedy decoding")
    p.add_argument("--system", default=None, help="system message opening the conversation")
    add_sampling_args(p, max_new_tokens=256, temperature=0.7, top_p=0.9, seed=None,
                      seed_help="sampling seed (default: unseeded)")
    p.add_argument("--no_stream", action="store_true", help="print each answer only when it is complete")
    return p


def respond(gen: Generator, messages: list[dict], params: SamplingParams, template: str, out: TextIO,
            stream: bool = True) -> str:
    """Generate the assistant's next turn for `messages`, writing it to `out` as it is produced."""
    prompt = encode_chat(messages, gen.tokenizer, template)
    if stream:
        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        text = gen.generate([prompt], params, on_text=[show])[0].text
    else:
        text = gen.generate([prompt], params)[0].text
        out.write(text)
    out.write("\n")
    out.flush()
    return text


def chat_session(gen: Generator, params: SamplingParams, template: str, *, system: str | None = None,
                 read: Callable[[str], str] = input, out: TextIO = sys.stdout, stream: bool = True) -> list[str]:
    """Interactive multi-turn loop; returns the assistant's answers in order."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    answers: list[str] = []
    while True:
        try:
            line = read("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            break
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history = history[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        out.write("Assistant: ")
        answer = respond(gen, history, params, template, out, stream)
        history.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def main(argv: list[str] | None = None, *, read: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    model_path_from_args(parser, args)
    model, tokenizer = load_from_args(args)
    gen = Generator(model, tokenizer)
    temperature = args.temperature if args.do_sample else 0.0
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        return [respond(gen, messages, params, args.prompt_template, out, not args.no_stream)]
    return chat_session(gen, params, args.prompt_template, system=args.system, read=read, out=out,
                        stream=not args.no_stream)


if __name__ == "__main__":
    cli.run(main)
