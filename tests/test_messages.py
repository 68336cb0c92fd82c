"""Every message names flags the command that prints it has (issue 20: `--pretrained` from `train`, `--cache` from
`inspect`, `--teacher-checkpoint` from `fit-teacher`, "run the same command again" where `train` needs
`--resume`), errors are one line, and `--help` is readable at 80 columns.

The library's messages are found by reading its source: every string in it that names a flag (`--name`) is
checked against the real flags (click's parameters of typer's commands) of the commands that reach that code,
per SCOPES below; a flag written right after a command's name ("precompute --content-hash") is checked against
that command. The messages the issue names are also triggered through the CLI."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import typer
from conftest import one_line, precompute_args, run_cli

from cskd_cache_cli.app import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")

# The commands whose runs reach each module (or "module:TopLevelName", which wins over its module). A module that
# names a flag and is not listed fails the test: say which commands call into it. () = library API only (no CLI).
DATA = ("precompute", "train", "verify", "fit-teacher")  # --data (evaluate's --val-data: open_source renames it)
SCOPES = {
    "cskd_cache/errors.py": DATA,
    "cskd_cache/distributed.py": ("precompute", "train"),
    "cskd_cache/data/folder.py": DATA,
    "cskd_cache/data/open.py": DATA,
    "cskd_cache/data/source.py": DATA,
    "cskd_cache/data/webdataset.py": DATA,
    "cskd_cache/data/matching.py": ("train", "verify"),
    "cskd_cache/data/recipe.py": ("precompute", "train", "verify"),
    "cskd_cache/data/params.py": ("precompute",),
    "cskd_cache/data/tensor_replay.py": ("precompute", "train", "verify"),  # train meets only recipes a tensor cache already passed
    "cskd_cache/data/recipe.py:Recipe": ("precompute",),  # train builds Recipe(input_size) from checked flags only
    "cskd_cache/cache/lock.py": ("precompute",),
    "cskd_cache/cache/store.py": ("inspect", "verify", "merge", "train", "precompute"),
    "cskd_cache/cache/write.py": ("precompute", "merge"),
    "cskd_cache/cache/files.py": ("verify", "export", "pull", "merge"),
    "cskd_cache/cache/share.py": ("export", "pull"),
    "cskd_cache/cache/share.py:merge": ("merge",),
    "cskd_cache/cache/inspect.py": ("inspect",),
    "cskd_cache/cache/verify.py": ("verify",),
    "cskd_cache/teacher/model.py": ("precompute", "verify", "train"),
    "cskd_cache/teacher/model.py:require_hub": ("precompute", "verify", "train", "fit-teacher"),
    "cskd_cache/teacher/model.py:resolve_precision": ("precompute", "train"),
    "cskd_cache/teacher/check.py": ("verify",),
    "cskd_cache/teacher/fit.py": ("fit-teacher",),
    "cskd_cache/teacher/precompute.py": ("precompute",),
    "cskd_cache/training/config.py": ("train",),
    "cskd_cache/training/setup.py": ("train",),
    "cskd_cache/training/train.py": ("train",),
    "cskd_cache/training/loader.py": ("train",),
    "cskd_cache/training/engine.py": ("train",),
    "cskd_cache/training/checkpoint.py": ("train",),
    "cskd_cache/training/student.py": ("train", "evaluate"),
    "cskd_cache/training/evaluate.py": ("evaluate",),
    "cskd_cache/training/task.py": (),
    "cskd_cache/training/cached_views.py": (),
    "cskd_cache/demo/plots.py": ("plot",),
    "cskd_cache/demo/demo.py": ("demo",),
    "cskd_cache/demo/readme.py": ("demo",),  # writes the demo command that made a table
    "cskd_cache/demo/experiment.py": ("experiment",),
    "cskd_cache/demo/datasets.py": ("experiment",),
    "cskd_cache/demo/report.py": (),  # a script with its own flags (python -m cskd_cache.demo.report)
    # the CLI: a command function's strings are its own; these are shared by some
    "cli/app.py:_root": ("cskd-cache",),
    "cli/app.py:MATCH_HELP": ("train", "verify"),
    "cli/app.py:config_option": ("precompute", "train"),
}


def command_flags() -> dict[str, set[str]]:
    """Every command's flags, as click parses them (typer's commands are click commands)."""
    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        flags = {"--help"}
        for p in cmd.params:
            flags.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        out[name] = flags
    out["cskd-cache"] = {o for p in group.params for o in p.opts if o.startswith("--")} | {"--help"}
    return out


FLAGS = command_flags()
SCOPES["cli/app.py:DECODE_HELP"] = ("precompute",)  # precompute --decode's help
SCOPES["cli/app.py:_OneLineErrors"] = tuple(FLAGS)  # "(see COMMAND --help)" after any usage error
COMMAND_WORD = re.compile(r"(?<![\w-])(?:cskd-cache\s+)?(" + "|".join(sorted(map(re.escape, FLAGS), key=len,
                                                                              reverse=True)) + r")(?![\w-])")


def wrong_flags(text: str, commands) -> list[str]:
    """The flags `text` names that a command it speaks for lacks: the command named just before the flag (in
    the same clause), else every one of `commands`."""
    bad = []
    for m in FLAG.finditer(text):
        clause = re.split(r"[;,()]", text[:m.start()])[-1]
        named = COMMAND_WORD.findall(clause)
        for cmd in ([named[-1]] if named else commands):
            if m.group() not in FLAGS[cmd]:
                bad.append(f"{m.group()} ({cmd} has no such flag)")
    return bad


def _text(node) -> str:
    """A string literal's text; an f-string's with {} for each value."""
    if isinstance(node, ast.Constant):
        return node.value
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _strings(tree):
    """(top-level name or None, line, text) of every string literal but docstrings; dicts keyed by command names
    give the command with each value."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []

    def visit(node, top, command=None):
        if isinstance(node, ast.Dict) and node.keys and all(
                isinstance(k, ast.Constant) and k.value in FLAGS for k in node.keys):
            for k, v in zip(node.keys, node.values):
                visit(v, top, k.value)
            return
        if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                               and id(node) not in docstrings):
            out.append((top, node.lineno, _text(node), command))
            if isinstance(node, ast.Constant):
                return
            for v in node.values:  # strings inside the f-string's {expressions}
                if isinstance(v, ast.FormattedValue):
                    visit(v.value, top, command)
            return
        for child in ast.iter_child_nodes(node):
            name = top
            if top is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = child.name
            elif top is None and isinstance(child, ast.Assign) and isinstance(child.targets[0], ast.Name):
                name = child.targets[0].id  # a module-level constant
            visit(child, name, command)

    visit(tree, None)
    return out


def library_messages():
    """(file:line, text, commands) for every string in the library and the CLI that names a flag."""
    found = []
    for path in sorted([*ROOT.glob("cskd_cache/**/*.py"), *ROOT.glob("cli/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for top, line, text, command in _strings(ast.parse(path.read_text())):
            if not FLAG.search(text):
                continue
            if command:
                commands = (command,)
            elif rel.startswith("cli/") and (top or "").replace("_", "-") in FLAGS:
                commands = ((top or "").replace("_", "-"),)  # a command function's help texts and messages
            else:
                commands = SCOPES.get(f"{rel}:{top}", SCOPES.get(rel))
            found.append((f"{rel}:{line}", text, commands))
    return found


def test_every_flag_a_message_names_is_a_flag_of_the_commands_that_print_it():
    messages = library_messages()
    assert len(messages) > 100  # the scan sees the library's messages
    unscoped = sorted({where.rsplit(":", 1)[0] for where, _, commands in messages if commands is None})
    assert not unscoped, f"say which commands reach {unscoped} (SCOPES)"
    wrong = [f"{where}: {', '.join(bad)}: {text[:100]!r}" for where, text, commands in messages
             if (bad := wrong_flags(text, commands))]
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_a_flag_from_another_command():
    """The checker itself: the issue's messages as they were are caught, their fixes pass."""
    assert wrong_flags("--pretrained: the Hugging Face hub cannot be reached", ("train",))
    assert wrong_flags("no cskd-cache at x; check --cache / the path", ("inspect",))
    assert wrong_flags("interrupted; run the same command again", ("train",)) == []
    assert wrong_flags("needs a cache made with precompute --content-hash", ("train",)) == []
    assert wrong_flags("use `cskd-cache pull X NEW --epochs ...`", ("precompute",)) == []
    assert wrong_flags("fine-tune it (cskd-cache fit-teacher), or pass --same-label-space", ("precompute",)) == []
    assert wrong_flags("(cskd-cache fit-teacher), or pass --same-label-space", ("train",))


def _flags_ok(command: str, text: str) -> None:
    assert not wrong_flags(text, (command,)), text


def test_a_cnn_student_is_one_line(tmp_path, image_folder):
    code, text = run_cli("train", "--student", "resnet18", "--data", image_folder, "--out", tmp_path / "run",
                         "--teacher-source", "none", "--epochs", "1", "--batch-size", "8", "--workers", "0")
    one_line(code, text, "resnet18", "not a ViT with a distillation token", "deit_s")


def test_hub_unreachable_names_the_commands_own_flags(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a machine without network
    code, text = run_cli("train", "--teacher-source", "online", "--teacher", "test_resnet", "--data", image_folder,
                         "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "8", "--workers", "0")
    one_line(code, text, "cannot be reached", "--teacher-checkpoint")
    _flags_ok("train", text)  # was: "--pretrained: ...", a flag train lacks
    code, text = run_cli("fit-teacher", "--data", image_folder, "--out", tmp_path / "t.pth", "--teacher",
                         "test_resnet", "--epochs", "1", "--workers", "0")
    one_line(code, text, "cannot be reached")
    _flags_ok("fit-teacher", text)  # was: "pass --teacher-checkpoint PATH", which fit-teacher rejects


def test_missing_cache_or_data_names_the_commands_own_flags(tmp_path):
    code, text = run_cli("inspect", tmp_path / "nothing.zarr")
    one_line(code, text, "nothing.zarr")
    _flags_ok("inspect", text)  # was: "check --cache / the path"
    code, text = run_cli("evaluate", "--checkpoint", tmp_path / "c.pth", "--val-data", tmp_path / "nothing")
    assert code == 2 and "Traceback" not in text
    _flags_ok("evaluate", text)


def test_a_config_that_is_not_yaml_is_one_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("lr: [1\n")  # YAML's own message spans four lines
    one_line(*run_cli("train", "--config", bad, "--data", "x", "--out", "y"), "--config", "run.yaml", "line 1")


@pytest.mark.parametrize("command, args, after", [
    ("train", ["--data", "x", "--out", "y"], "add --resume to the same command"),
    ("precompute", ["--data", "x", "--out", "y"], "run the same command again to resume"),
    ("inspect", ["x"], None),
])
def test_ctrl_c_says_how_to_continue(monkeypatch, command, args, after):
    """Ctrl-C (KeyboardInterrupt wherever the library is): exit 130, one line, the command's own way to resume."""
    import cskd_cache.cache.inspect
    import cskd_cache.teacher.precompute
    import cskd_cache.training.train

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr({"train": cskd_cache.training.train, "precompute": cskd_cache.teacher.precompute,
                         "inspect": cskd_cache.cache.inspect}[command],
                        {"train": "train", "precompute": "precompute", "inspect": "describe_cache"}[command],
                        interrupt)
    code, text = run_cli(command, *args)
    assert code == 130 and len(text.strip().splitlines()) == 1 and "Traceback" not in text, text
    assert (after in text) if after else text.strip() == "error: interrupted", text
    _flags_ok(command, text)


def test_help_is_readable_at_80_columns():
    """Every flag of every command appears whole in its --help at 80 columns (rich's panels cut them), and no
    line is wider than the terminal."""
    from typer.testing import CliRunner

    group = typer.main.get_command(app)
    for name, cmd in [*group.commands.items(), ("", group)]:
        r = CliRunner().invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"},
                               terminal_width=80)
        assert r.exit_code == 0, r.output
        shown = {o for p in cmd.params if not getattr(p, "hidden", False) for o in (*p.opts, *p.secondary_opts)
                 if o.startswith("--")}
        missing = shown - set(FLAG.findall(r.output))
        assert not missing, (name, sorted(missing), r.output)
        assert max(map(len, r.output.splitlines())) <= 80 and "…" not in r.output, r.output


def test_inspect_requirements_installs_with_pip_today(tmp_path, image_folder, teacher_checkpoint):
    """`inspect --requirements` is a file `pip install -r` takes today: pinned libraries, and no requirement on a
    cskd-cache release PyPI does not have (issue 20: `cskd-cache>=0.2.0`); a comment says how to install it."""
    from packaging.requirements import Requirement

    out = tmp_path / "c.zarr"
    assert run_cli(*precompute_args(image_folder, out, teacher_checkpoint))[0] == 0
    code, text = run_cli("inspect", out, "--requirements")
    lines = [line for line in text.splitlines() if line.strip()]
    pins = [Requirement(line) for line in lines if not line.startswith("#")]
    assert code == 0 and {r.name for r in pins} == {"pillow", "torch", "torchvision", "timm", "numpy"}, text
    assert all(str(r.specifier).startswith("==") for r in pins), text
    notes = " ".join(line for line in lines if line.startswith("#"))
    assert "cskd-cache 0." in notes and "not on PyPI" in notes and "pip install" in notes, text
