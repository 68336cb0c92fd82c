"""The `cskd-cache` command line. It only parses flags and calls the library.

Every error a user can cause is one line on stderr: the library's (CacheError, exit 2), a bad flag or value
(click's usage errors, exit 2, with "see --help"), an interrupt (exit 130); never a traceback. The commands live
in cache.py (stage one and looking at caches), training.py (stage two, the teacher) and extras.py (demo).
"""

from __future__ import annotations

import enum
import functools
import os
import sys

import typer
from typer.core import TyperGroup

from cskd_cache import __version__
from cskd_cache.errors import CacheError


class _OneLineErrors(TyperGroup):
    """Typer reports a bad flag with a usage block and a framed message; ours is one line."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors
            ctx = getattr(e, "ctx", None)
            name = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {_one_line(e.format_message())}{name}", err=True)
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(rv if isinstance(rv, int) else 0)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cskd-cache {__version__}")
        raise typer.Exit()


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD).")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Offline teacher-label cache for Cumulative Spatial Knowledge Distillation (CSKD)."""


def _one_line(message: str) -> str:
    """A message that quotes another library's (YAML's, an OS's) may span lines: the user gets one."""
    return " ".join(message.split())


def fail(message: str, code: int = 2):
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(code)


# What to do after Ctrl-C, by command: how each one continues where it stopped (the others have nothing to resume)
AFTER_INTERRUPT = {
    "precompute": "run the same command again to resume",
    "pull": "run the same command again to resume",
    "train": "add --resume to the same command to continue the run",
    "fit-teacher": "run the same command again to resume",
    "demo": "run the same command again: finished stages are reused",
    "experiment": "run the same command again: finished runs are reused",
}


def user_errors(fn):
    """Turn the library's user-facing errors (and a few OS ones) into a one-line message and exit code 2."""
    command = fn.__name__.replace("_", "-")  # typer's command name

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CacheError as e:
            fail(str(e))
        except KeyboardInterrupt:
            hint = AFTER_INTERRUPT.get(command)
            fail("interrupted" + (f"; {hint}" if hint else ""), code=130)
        except OSError as e:
            fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))

    return wrapper


def _choices(name: str, *values: str) -> type[enum.Enum]:
    """A set of choices for typer (given case-insensitively: --encoding CKF is ckf); `plain()` turns the member
    back into the plain string the library takes."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Encoding = _choices("Encoding", "ckf", "full", "topk")
Precision = _choices("Precision", "auto", "fp32", "fp16", "bf16")
FixedPrecision = _choices("FixedPrecision", "fp32", "fp16", "bf16")
TeacherSource = _choices("TeacherSource", "cache", "online", "none")
LossType = _choices("LossType", "hard", "soft")
AlphaSchedule = _choices("AlphaSchedule", "linear", "x2", "cos", "local")
Match = _choices("Match", "key", "stem", "content")
Replay = _choices("Replay", "pil", "tensor")
Decode = _choices("Decode", "device", "worker")
REPLAY_HELP = ("How views are made: pil (timm's transform in the loader workers) | tensor (timm's draws in the "
               "workers, pixels by torch kernels on the training device: decode, crop, RandAugment; for GPU nodes "
               "whose cores cannot feed the student). A cache is used with the backend that made it.")
DECODE_HELP = ("--replay tensor: where JPEGs are decoded. device (nvJPEG on CUDA: least worker CPU; its pixels differ "
               "a little from libjpeg-turbo's) | worker (libjpeg-turbo in the loader workers, ~0.3 ms of CPU a view "
               "with 3 repeats: timm's PIL views exactly on every device, so the cache replays exactly anywhere).")
MATCH_HELP = ("How --data's images are found for the cache's samples: key (the same packaging), stem (file names "
              "without folders and extensions: another packaging of the same images), content (sha256 of each "
              "file; needs precompute --content-hash).")


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: str | None):
    """--config run.yaml: the file's values become the command's defaults (flags on the command line still win).
    Keys are flag names with or without dashes (`lr`, `warmup-epochs`, `reprob`, ...); an args.yaml a run wrote
    is a valid config."""
    if not value:
        return value
    import yaml

    try:
        with open(value) as f:
            given = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {value}: {e}") from None
    if not isinstance(given, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of flag names to values")
    names = {}
    for p in ctx.command.params:
        for opt in (*p.opts, *p.secondary_opts):
            names[opt.lstrip("-").replace("-", "_")] = p.name
        names[p.name] = p.name
    unknown = sorted(k for k in given if str(k).lstrip("-").replace("-", "_") not in names)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown flag(s) {', '.join(map(str, unknown))} for "
                                 f"`{ctx.command_path}`")
    ctx.default_map = {names[str(k).lstrip("-").replace("-", "_")]: v for k, v in given.items()
                       if v is not None}
    return value


def config_option():
    return typer.Option(None, "--config", is_eager=True, callback=_load_config, expose_value=False,
                        help="A YAML file of flags (names as on the command line); flags given here win. A run's "
                             "args.yaml is one.")


def plain(values: dict) -> dict:
    """Choice members -> their strings (configs are saved in weights-only checkpoints: plain types only)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in values.items()}


def default_workers() -> int:
    """Data-loading workers: the cores this process may use, at most 8 (no oversubscription warning on small
    machines, no idle cores on big ones)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(8, cores))


def main() -> None:
    app(prog_name="cskd-cache")


from . import cache, extras, share, training  # noqa: E402,F401 - register the commands

if __name__ == "__main__":
    sys.exit(main())
