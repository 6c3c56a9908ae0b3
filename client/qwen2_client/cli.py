"""`qwen2-client`: talk to a qwen2-cluster server from the shell.

    qwen2-client generate "The capital of France is" --max-new-tokens 8 --temperature 0 --json
    qwen2-client --target host:50051 stream --token-ids 9707,11,1879 --max-new-tokens 32
    qwen2-client chat '[{"role": "user", "content": "Hi"}]'        # or chat @messages.json
    qwen2-client tokenize "Hello world"
    qwen2-client classify "I loved it" "I hated it"                  # a sequence classifier / reward model
    qwen2-client embed "a sentence" --pooling mean --dimensions 256 --json
    qwen2-client classify-tokens "Alice lives in Paris"
    qwen2-client qa "Question: who lives in Paris? Context: Alice lives in Paris."
    qwen2-client info
    qwen2-client health

Exit status: 0 ok, 2 invalid request (or usage), 3 server unavailable / overloaded (or not SERVING),
1 anything else. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from ._common import DEFAULT_TARGET
from .client import Client
from .errors import OverloadedError, Qwen2Error, UnavailableError, ValidationError
from .retry import RetryPolicy
from .types import Delta, Result

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command-line input found after parsing (exit 2)."""


def int_list(s: str) -> list[int]:
    """"1,2,3" (spaces allowed, or a JSON list) -> [1, 2, 3]."""
    s = s.strip()
    if s.startswith("["):
        s = s[1:-1] if s.endswith("]") else s[1:]
    try:
        ids = [int(x) for x in s.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("token ids must be >= 0")
    return ids


def logit_bias(s: str) -> dict[int, float]:
    """"151643:-100,9707:5" or a JSON object {"151643": -100} -> {151643: -100.0}."""
    try:
        if s.strip().startswith("{"):
            return {int(k): float(v) for k, v in json.loads(s).items()}
        return {int(k): float(v) for k, v in (pair.split(":") for pair in s.split(",") if pair.strip())}
    except (ValueError, AttributeError):
        raise argparse.ArgumentTypeError(f'expected ID:BIAS pairs ("151643:-100,9707:5") or a JSON object, '
                                         f"got {s!r}") from None


def _connection_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the subcommand (the subcommand's copy must not reset them)."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=d(os.environ.get("QWEN2_TARGET", DEFAULT_TARGET)),
                   help="server address HOST:PORT (env QWEN2_TARGET; default %s)" % DEFAULT_TARGET)
    g.add_argument("--tls", action="store_true", default=d(False), help="use TLS (system roots unless --ca)")
    g.add_argument("--ca", default=d(None), metavar="FILE", help="PEM root certificates (implies --tls)")
    g.add_argument("--cert", default=d(None), metavar="FILE", help="client certificate chain, PEM (mutual TLS)")
    g.add_argument("--key", default=d(None), metavar="FILE", help="client private key, PEM (mutual TLS)")
    g.add_argument("--server-name", default=d(None), help="TLS server name override")
    g.add_argument("--token", default=d(os.environ.get("QWEN2_TOKEN")),
                   help="bearer token sent as `authorization` metadata (env QWEN2_TOKEN)")
    g.add_argument("--timeout", type=float, default=d(None), metavar="SECONDS", help="deadline per command")
    g.add_argument("--retries", type=int, default=d(4), metavar="N",
                   help="attempts on UNAVAILABLE / RESOURCE_EXHAUSTED (1 = no retry; default 4)")


def _generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation parameters (unset ones take the server's defaults)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="STR", help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int_list, metavar="IDS", help="comma-separated")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--logprobs", type=int, metavar="N", help="top-N logprobs per token (0 = chosen token only)")
    g.add_argument("--logit-bias", type=logit_bias, metavar="ID:BIAS,...",
                   help='bias per token id, in [-100, 100]: "151643:-100,9707:5" or a JSON object')
    g.add_argument("--min-tokens", type=int, metavar="N", help="no EOS, stop token or stop string before N tokens")
    g.add_argument("--prompt-logprobs", type=int, metavar="N",
                   help="each prompt token's logprob and top-N (then --max-new-tokens may be 0)")
    g.add_argument("--no-skip-special-tokens", dest="skip_special_tokens", action="store_false", default=None,
                   help="keep special tokens in the text")
    g.add_argument("--include-stop-str-in-output", action="store_true", default=None,
                   help="keep the matched stop string in the text")
    g.add_argument("--cache-salt", help="share cached prompt blocks only with requests of the same salt")
    g = p.add_argument_group("structured outputs (at most one: the output matches it)")
    g.add_argument("--json-schema", metavar="SCHEMA", help="a JSON schema: JSON, @FILE or -")
    g.add_argument("--json-object", action="store_true", default=None, help="any JSON object")
    g.add_argument("--regex", metavar="REGEX")
    g.add_argument("--choice", action="append", metavar="STR", help="one of these strings (repeatable)")
    g.add_argument("--grammar", metavar="EBNF", help="a context-free grammar (`root` starts it): text, @FILE or -")
    g.add_argument("--request-id")
    p.add_argument("--json", action="store_true", help="print JSON (stream: one object per line)")
    p.add_argument("-v", "--verbose", action="store_true", help="print finish reason and usage to stderr")


PARAM_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
              "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs",
              "logit_bias", "min_tokens", "prompt_logprobs", "skip_special_tokens", "include_stop_str_in_output",
              "cache_salt", "json_schema", "json_object", "regex", "choice", "grammar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen2-client", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(ap, suppress=False)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _connection_options(p, suppress=True)
        return p

    for name, help in (("generate", "generate from text or token ids, print the result"),
                       ("stream", "generate, printing text as it arrives")):
        p = command(name, help)
        p.add_argument("text", nargs="?", metavar="TEXT", help="prompt text ('-' reads stdin)")
        p.add_argument("--token-ids", type=int_list, metavar="IDS", help="prompt token ids, comma-separated")
        _generation_options(p)

    p = command("chat", "generate from chat messages (the checkpoint's chat template)")
    p.add_argument("messages", metavar="MESSAGES",
                   help='JSON list of {"role", "content"}, @FILE holding one, or - for stdin')
    p.add_argument("--no-generation-prompt", dest="add_generation_prompt", action="store_false")
    p.add_argument("--stream", action="store_true", help="print text as it arrives")
    p.add_argument("--tools", metavar="TOOLS", help='JSON list of tools ({"type": "function", "function": {"name", '
                   '"description", "parameters"}}), @FILE or -; calls print as JSON lines after the text')
    p.add_argument("--tool-choice", metavar="CHOICE", help="auto (default with tools), none, required, or a "
                   "function's name")
    p.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false", default=None,
                   help="at most one call")
    _generation_options(p)

    p = command("tokenize", "tokenize text or chat messages")
    p.add_argument("text", nargs="?", metavar="TEXT", help="text ('-' reads stdin)")
    p.add_argument("--messages", metavar="MESSAGES", help="chat messages instead: JSON, @FILE or -")
    p.add_argument("--no-generation-prompt", dest="add_generation_prompt", action="store_false")
    p.add_argument("--json", action="store_true")

    for name, help in (("classify", "sequence classification: each input's label and probability"),
                       ("classify-tokens", "token classification: each token's label"),
                       ("qa", "extractive QA: each input's (question and context) best answer span"),
                       ("embed", "embeddings: one JSON list of floats per input")):
        p = command(name, help)
        p.add_argument("text", nargs="*", metavar="TEXT", help="inputs ('-' reads one from stdin)")
        p.add_argument("--token-ids", type=int_list, action="append", metavar="IDS",
                       help="an input as token ids, comma-separated (repeatable)")
        p.add_argument("--request-id")
        p.add_argument("--json", action="store_true", help="print the results as one JSON list")
        if name == "embed":
            p.add_argument("--pooling", choices=["last", "mean"], help="default: last")
            p.add_argument("--no-normalize", dest="normalize", action="store_false", default=None)
            p.add_argument("--dimensions", type=int, help="keep the first N values (Matryoshka)")
        if name == "qa":
            p.add_argument("--max-answer-tokens", type=int)

    p = command("info", "print the served model's information")
    p.add_argument("--json", action="store_true")

    p = command("health", "grpc.health.v1 Check; exit 0 when SERVING, 3 otherwise")
    p.add_argument("--service", default="", help='service name (default "": the whole server)')
    return ap


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keyword arguments the user gave (None = not given, so not sent)."""
    params = {name: getattr(args, name) for name in PARAM_ARGS if getattr(args, name, None) is not None}
    for name in ("json_schema", "grammar"):
        if name in params:
            params[name] = read_arg(params[name])
    return params


def tool_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """chat's tools, tool_choice and parallel_tool_calls, as given."""
    out: dict[str, Any] = {}
    if args.tools is not None:
        try:
            out["tools"] = json.loads(read_arg(args.tools))
        except json.JSONDecodeError as e:
            raise UsageError(f"--tools is not valid JSON: {e}") from None
        if not isinstance(out["tools"], list):
            raise UsageError("--tools must be a JSON list of tools")
    if args.tool_choice is not None:
        choice = args.tool_choice
        out["tool_choice"] = choice if choice in ("auto", "none", "required") else {"name": choice}
    if args.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = args.parallel_tool_calls
    return out


def read_arg(value: str) -> str:
    """'-' -> stdin, '@FILE' -> the file's text, anything else as is."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"cannot read {value[1:]}: {e.strerror}") from None
    return value


def parse_messages(value: str) -> list[dict[str, str]]:
    """A JSON list of {"role", "content"} (or {"messages": [...]}) from a string, @FILE or stdin."""
    try:
        data = json.loads(read_arg(value))
    except json.JSONDecodeError as e:
        raise UsageError(f"messages are not valid JSON: {e}") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not all(isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m)
                                             for m in data):
        raise UsageError('messages must be a JSON list of {"role": ..., "content": ...} objects')
    return data


def prompt_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.text is not None and args.token_ids is not None:
        raise UsageError("give TEXT or --token-ids, not both")
    if args.token_ids is not None:
        return {"token_ids": args.token_ids}
    if args.text is None:
        raise UsageError("give TEXT (or - for stdin) or --token-ids")
    return {"text": read_arg(args.text)}


def result_json(result: Result) -> dict[str, Any]:
    """The --json object: token_ids, text, finish_reason, logprobs (chosen + top-n per token), usage, ..."""
    return result.to_dict()


def delta_json(delta: Delta) -> dict[str, Any]:
    return delta.to_dict()


def make_client(args: argparse.Namespace) -> Client:
    return Client(args.target, tls=args.tls, root_certificates=args.ca, private_key=args.key,
                  certificate_chain=args.cert, server_name=args.server_name, token=args.token,
                  timeout=args.timeout, retry=RetryPolicy(max_attempts=max(1, args.retries)))


def _summary(final_reason: str, usage, out) -> None:
    print(f"[finish_reason={final_reason} prompt_tokens={usage.prompt_tokens} "
          f"generated_tokens={usage.generated_tokens}]", file=out)


def _print_result(result: Result, args, out) -> None:
    if args.json:
        print(json.dumps(result_json(result), ensure_ascii=False), file=out)
    else:
        print(result.text, file=out)
        for call in result.tool_calls:
            print(_call_line(call), file=out)
    if args.verbose:
        _summary(result.finish_reason, result.usage, sys.stderr)


def _call_line(call) -> str:
    return json.dumps({"id": call.id, "name": call.name, "arguments": call.arguments}, ensure_ascii=False)


def _print_stream(stream, args, out) -> None:
    final, calls = None, []
    with stream:
        for delta in stream:
            if args.json:
                print(json.dumps(delta_json(delta), ensure_ascii=False), file=out, flush=True)
            else:
                print(delta.text, end="", file=out, flush=True)
                calls += delta.tool_calls
            final = delta.final or final
    if not args.json:
        print(file=out)
        for call in calls:
            print(_call_line(call), file=out)
    if args.verbose and final is not None:
        _summary(final.finish_reason, final.usage, sys.stderr)


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    with make_client(args) as client:
        if args.command in ("generate", "stream"):
            kw = dict(prompt_kwargs(args), request_id=args.request_id, **generation_params(args))
            if args.command == "generate":
                _print_result(client.generate(**kw), args, out)
            else:
                _print_stream(client.generate_stream(**kw), args, out)
        elif args.command == "chat":
            kw = dict(messages=parse_messages(args.messages), add_generation_prompt=args.add_generation_prompt,
                      request_id=args.request_id, **tool_kwargs(args), **generation_params(args))
            if args.stream:
                _print_stream(client.generate_stream(**kw), args, out)
            else:
                _print_result(client.generate(**kw), args, out)
        elif args.command == "tokenize":
            if (args.text is None) == (args.messages is None):
                raise UsageError("give TEXT or --messages (one of them)")
            if args.messages is not None:
                r = client.tokenize(messages=parse_messages(args.messages),
                                    add_generation_prompt=args.add_generation_prompt)
            else:
                if not args.add_generation_prompt:
                    raise UsageError("--no-generation-prompt applies to --messages only")
                r = client.tokenize(text=read_arg(args.text))
            if args.json:
                print(json.dumps(r.to_dict(), ensure_ascii=False), file=out)
            else:
                if r.rendered:
                    print(r.rendered, file=sys.stderr)
                print(",".join(map(str, r.token_ids)), file=out)
        elif args.command in ("classify", "classify-tokens", "qa", "embed"):
            _pool(client, args, out)
        elif args.command == "info":
            info = client.model_info()
            if args.json:
                print(json.dumps(info.to_dict()), file=out)
            else:
                for k, v in info.to_dict().items():
                    print(f"{k}: {','.join(map(str, v)) if isinstance(v, list) else v}", file=out)
        elif args.command == "health":
            status = client.health(args.service, timeout=args.timeout)
            print(status, file=out)
            return EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE
    return EXIT_OK


def _pool(client: Client, args: argparse.Namespace, out) -> None:
    inputs = [read_arg(t) for t in args.text] + (args.token_ids or [])
    if not inputs:
        raise UsageError("give at least one TEXT or --token-ids")
    if args.command == "embed":
        results = client.embed(inputs, pooling=args.pooling, normalize=args.normalize, dimensions=args.dimensions,
                               request_id=args.request_id)
        lines = [json.dumps(r.values) for r in results]
    elif args.command == "classify":
        results = client.classify(inputs, request_id=args.request_id)
        lines = [f"{r.label}\t{r.probs[r.label_id]:.4f}" for r in results]
    elif args.command == "classify-tokens":
        results = client.classify_tokens(inputs, request_id=args.request_id)
        lines = [" ".join(f"{t}:{c.label}" for t, c in zip(r.token_ids, r.tokens)) for r in results]
    else:
        results = client.extractive_qa(inputs, max_answer_tokens=args.max_answer_tokens, request_id=args.request_id)
        lines = [r.answer for r in results]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], ensure_ascii=False), file=out)
    else:
        print("\n".join(lines), file=out)


def exit_code(err: BaseException) -> int:
    if isinstance(err, (ValidationError, UsageError, ValueError, TypeError)):
        return EXIT_INVALID
    if isinstance(err, (UnavailableError, OverloadedError)):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:
        return EXIT_ERROR
    except (Qwen2Error, UsageError, ValueError, TypeError, OSError) as e:
        print(f"qwen2-client: error: {error_line(e)}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("qwen2-client: interrupted", file=sys.stderr)
        return 130


def error_line(err: BaseException) -> str:
    """One line: the status and the server's message; for INVALID_ARGUMENT every field violation."""
    msg = str(err)
    if isinstance(err, ValidationError) and err.field_violations:
        msg = f"{err.code.name if err.code else 'INVALID_ARGUMENT'}: " + "; ".join(f"{f}: {d}" if f else d for f, d in err.field_violations)
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
