"""`python -m kimi_ops <command>`: the model-level commands, in this process (no Ray, no Prefect;
`kimi-label` offers the same commands beside the pipeline's).

Commands:
  generate              run one message list (or, with --batch, a list of them) through the engine
  audio-tokens          GLM-4-Voice VQ codes of audio files, one JSON line per file
  label                 label audio files with tasks (transcript, caption, emotion, scene, ...),
                        one JSON line per file; a file that cannot be read becomes an error line
  make-tiny-checkpoint  write a random checkpoint in the official layout (demo, tests, benchmarks)
  demo                  tiny random checkpoint + self-made sample audio -> a table of labels
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from kimi_ops.audio.segmenters import DEFAULT_SEGMENTER, SEGMENTERS
from kimi_ops.errors import KimiError


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_non_negative_int, _positive_int = _int_at_least(0), _int_at_least(1)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (or a Hugging Face model id)")
    p.add_argument("--glm-tokenizer", default=None,
                   help="GLM-4-Voice tokenizer folder (default: <model>/glm-4-voice-tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="conversations decoded together (default: %(default)s)")


BUDGET_HELP = ("steps to generate; -1 (default): the reference's budget, 7500 minus the "
               "prompt's tokens (1500 minus them with --output-type both)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-type", choices=["text", "both"], default="text",
                   help="both: also the audio stream's tokens (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=-1, help=BUDGET_HELP)
    for stream, window in (("text", 16), ("audio", 64)):
        p.add_argument(f"--{stream}-temperature", type=float, default=0.0,
                       help=f"{stream} stream: 0 = greedy, else sampling (default: %(default)s)")
        p.add_argument(f"--{stream}-top-k", type=int, default=5,
                       help="sample among the k likeliest ids; <= 0: all (default: %(default)s)")
        p.add_argument(f"--{stream}-repetition-penalty", type=float, default=1.0,
                       help="> 1 penalises ids of the last window; 1 = off (default: %(default)s)")
        p.add_argument(f"--{stream}-repetition-window-size", type=int, default=window,
                       help="tokens the penalty looks back over (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampled draws are reproducible per seed (default: %(default)s)")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="asr",
                   help="comma-separated: asr, caption, emotion, scene[:cochlscene|tut2017], "
                        "sound_event[:vocalsound|nonspeech7k], question, or a registered task")
    p.add_argument("--language", choices=["auto", "en", "zh"], default="auto",
                   help="asr prompt language")
    p.add_argument("--question", default=None, help="the question for the `question` task")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_new_tokens", "text_temperature", "text_top_k", "text_repetition_penalty",
             "text_repetition_window_size", "audio_temperature", "audio_top_k",
             "audio_repetition_penalty", "audio_repetition_window_size", "seed"]
    return {n: getattr(args, n) for n in names}


def _load_engine(args: argparse.Namespace):
    import torch

    from kimi_ops.engine.api import KimiAudio

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return KimiAudio(args.model, device=args.device, dtype=dtype,
                     glm_tokenizer=args.glm_tokenizer, max_batch_size=args.max_batch_size)


def _resolve_audio_paths(messages: Any, base: Path) -> Any:
    if not isinstance(messages, list):
        return messages
    resolved = []
    for msg in messages:
        if isinstance(msg, dict) and msg.get("message_type") == "audio" and isinstance(
                msg.get("content"), str) and msg["content"]:
            content = Path(msg["content"]).expanduser()
            msg = {**msg, "content": str(content if content.is_absolute() else base / content)}
        resolved.append(msg)
    return resolved


def _result_json(res) -> dict[str, Any]:
    return {"text": res.text, "text_token_ids": res.text_token_ids,
            "audio_token_ids": res.audio_token_ids, "finish_reason": res.finish_reason,
            "prompt_tokens": res.prompt_tokens}


def _check_messages(data: Any, path: Path, batch: bool) -> None:
    """Validate the messages file before the model loads, numbering --batch conversations from 1
    as a reader counts them (the engine's own checks say "conversation 0")."""
    from kimi_ops.engine.prompt import validate_messages

    if not batch:
        validate_messages(data, str(path))
        return
    if not isinstance(data, list):
        raise KimiError(f"{path}: with --batch the file must hold a list of message lists")
    for n, conversation in enumerate(data, start=1):
        where = f"{path}: conversation {n} of {len(data)}"
        if not isinstance(conversation, list):
            raise KimiError(f"{where}: with --batch each item must be a message list, "
                            f"got {type(conversation).__name__}")
        validate_messages(conversation, f"{where}, messages")


def cmd_generate(args: argparse.Namespace) -> int:
    path = Path(args.messages)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KimiError(f"{path}: cannot read the messages file ({exc})") from None
    _check_messages(data, path, args.batch)
    conversations = data if args.batch else [data]
    conversations = [_resolve_audio_paths(c, path.parent) for c in conversations]
    from kimi_ops.engine.api import sampling_params

    sampling_params(output_type=args.output_type, **_sampling_kwargs(args))  # before the model
    engine = _load_engine(args)
    results = engine.generate_batch(conversations, output_type=args.output_type,
                                    **_sampling_kwargs(args))
    out = [_result_json(r) for r in results]
    print(json.dumps(out if args.batch else out[0], ensure_ascii=False))
    return 0


def cmd_audio_tokens(args: argparse.Namespace) -> int:
    engine = _load_engine(args)
    status = 0
    for path in args.files:
        try:
            enc = engine.encode_audio([path])[0]
            line = {"path": path, "tokens": [int(t) for t in enc.tokens]}
        except KimiError as exc:
            line, status = {"path": path, "error": str(exc), "error_kind": exc.kind}, 1
        print(json.dumps(line), flush=True)
    return status


def _tasks(args: argparse.Namespace):
    from kimi_ops.tasks import get_task

    specs = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not specs:
        raise ValueError("--tasks: name at least one task")
    if args.question is not None and not any(s.partition(":")[0] == "question" for s in specs):
        print(f"warning: --question {args.question!r} is ignored: it is the question task's "
              f"question, and the tasks are {','.join(specs)}", file=sys.stderr)
    return [get_task(spec, language=args.language, question=args.question) for spec in specs]


def cmd_label(args: argparse.Namespace) -> int:
    from kimi_ops.tasks.runner import label_files

    tasks = _tasks(args)  # validated before the model is loaded
    engine = _load_engine(args)
    failed = False
    step = engine.max_batch_size  # lines come out a batch of files at a time, not at the end
    for start in range(0, len(args.files), step):
        rows = label_files(engine, args.files[start: start + step], tasks,
                           max_new_tokens=args.max_new_tokens, segmenter=args.segmenter)
        for row in rows:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        failed = failed or any("error" in r for r in rows)
    return 1 if failed else 0


def cmd_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint

    target = args.output or args.out
    if not target or (args.output and args.out and args.output != args.out):
        raise KimiError("make-tiny-checkpoint: name one folder to write (OUT or --output)")
    try:
        out = make_tiny_checkpoint(target, seed=args.seed, preset=args.preset,
                                   num_shards=args.num_shards, overwrite=args.overwrite)
    except OSError as exc:  # not a folder, not writable, a real model's folder
        raise KimiError(str(exc) if isinstance(exc, FileExistsError)
                        else f"{target}: cannot write the checkpoint ({exc.strerror or exc})"
                        ) from None
    print(out)
    return 0


DEMO_TASKS = "asr,caption,emotion,scene,sound_event"


def _label_with_score(row: dict[str, Any], task: str) -> str:
    return f"{row[task]} {row[task + '_scores'][row[task]]:.2f}"


def cmd_demo(args: argparse.Namespace) -> int:
    from kimi_ops.audio.samples import write_sample_audio
    from kimi_ops.engine.api import KimiAudio
    from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint
    from kimi_ops.tasks import get_task
    from kimi_ops.tasks.runner import label_files

    out = Path(args.out)
    checkpoint = out / "tiny_checkpoint"
    if not (checkpoint / "config.json").exists():
        make_tiny_checkpoint(checkpoint, seed=0, preset="tiny")
    files = [str(p) for p in write_sample_audio(out / "audio")]
    files.append(str(out / "audio" / "missing.wav"))  # shows how a bad input is reported
    print(f"checkpoint: {checkpoint}  (RANDOM weights: the labels below are meaningless; "
          f"point --model at a real Kimi-Audio-7B-Instruct folder for real labels)")
    engine = KimiAudio(checkpoint, device="cpu")
    tasks = [get_task(t) for t in DEMO_TASKS.split(",")]
    rows = label_files(engine, files, tasks, max_new_tokens=args.max_new_tokens)
    labels = out / "labels.jsonl"
    labels.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{'file':<28}{'sec':>6}{'seg':>4}  {'emotion':<14}{'scene':<22}{'sound_event':<22}"
          f"transcript")
    for r in rows:
        name = Path(r["path"]).name
        if "error" in r:
            print(f"{name:<28}{'':>6}{'':>4}  error ({r['error_kind']}): {r['error']}")
            continue
        emotion, scene, sound = (_label_with_score(r, t) for t in ("emotion", "scene", "sound_event"))
        print(f"{name:<28}{r['duration_s']:>6.1f}{r['num_segments']:>4}  {emotion:<14}"
              f"{scene:<22}{sound:<22}{r['transcript'][:40]!r}")
    ok = sum("error" not in r for r in rows)
    print(f"{ok} labelled, {len(rows) - ok} errors; JSON lines with every field in {labels}")
    return 0


def build_parser(prog: str = "python -m kimi_ops") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(sub, skip: tuple[str, ...] = ()) -> None:
    """The model-level commands as subcommands of `sub` (less `skip`); each sets `func`, which
    `run` calls (`kimi-label` adds them to its own commands)."""
    p = sub.add_parser("generate", help="run message list(s) through the model")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--messages", required=True, help="JSON file: a message list (or a list of them)")
    p.add_argument("--batch", action="store_true", help="the file holds a list of message lists")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("audio-tokens", help="GLM-4-Voice VQ codes of audio files")
    _add_model_args(p)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_audio_tokens)

    p = sub.add_parser("label", help="label audio files with tasks (JSON lines)")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--max-new-tokens", type=int, default=-1,
                   help="per segment of up to 30 s; " + BUDGET_HELP.split("; ", 1)[1])
    p.add_argument("--segmenter", choices=SEGMENTERS, default=DEFAULT_SEGMENTER,
                   help="cut files by voice activity (vad: the rest is not sent to asr) or at "
                        "quiet points (energy)")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("make-tiny-checkpoint", help="random checkpoint in the official layout")
    p.add_argument("out", nargs="?", help="folder to write (refused if it holds anything else "
                                           "than an earlier tiny checkpoint, unless --overwrite)")
    p.add_argument("--output", default=None, help="the folder to write, as an option (as the "
                                                  "pipeline's commands take their output)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny",
                   help="tiny: the shared parity checkpoint's sizes; small: ~33 M LM parameters")
    p.add_argument("--num-shards", type=_positive_int, default=None,
                   help="main-model weight files (default: 1 for tiny, 2 for small)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that holds other files")
    p.set_defaults(func=cmd_make_tiny_checkpoint)

    if "demo" in skip:
        return
    p = sub.add_parser("demo", help="label the bundled sample audio with a tiny random checkpoint")
    p.add_argument("--output", "--out", dest="out", default="demo_output")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None, prog: str = "python -m kimi_ops") -> int:
    """`prog`: the command's name in usage and errors."""
    return run(build_parser(prog).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """A parsed model-level command: 0, 1 when some input failed (its error line printed), 2
    with an `error:` line for bad arguments or input."""
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (`... | head -1`): stop quietly as a Unix tool killed by SIGPIPE
        # would, not with a traceback (and a second one when Python flushes stdout at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KimiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid sampling parameters and the like
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
