"""What README.md and docs/*.md say is what the code does: every command line of the scripts and of
benchmark/*.py in them parses with today's flags (and the training scripts' resolve to a valid
setting), every flag they name is a flag, every logged tag is logged, every file they link exists. No
training: the commands are parsed in this process, as their scripts parse them."""

import glob
import os
import re
import shlex
import sys

import pytest
import tyro

import drm
import drm_adroit
import drm_metaworld
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import checkpoint_cost  # noqa: E402
import metaworld_shadows  # noqa: E402
import official_parity  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import soak  # noqa: E402
import speed  # noqa: E402

DOCS = ["README.md", *sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SCRIPTS = {"drm.py": drm, "drm_adroit.py": drm_adroit, "drm_metaworld.py": drm_metaworld}
BENCHMARKS = {"run.py": run, "report.py": report, "speed.py": speed, "official_parity.py": official_parity,
              "checkpoint_cost.py": checkpoint_cost, "metaworld_shadows.py": metaworld_shadows, "soak.py": soak}  # fmt: skip
# flags of other programs that the docs name (pip, apt-get, pytest, git, tensorboard, sbatch, scancel)
OTHER_PROGRAMS_FLAGS = {
    "--logdir", "--help",
    "--no-install-recommends", "--array", "--partition", "--gpus-per-node", "--time", "--cpus-per-task", "--signal",
    "--full", "--user", "--state", "--parsable", "--mem", "--wrap", "--durations", "--dist", "--check", "--diff",
    "--fix", "--output-format",
}  # fmt: skip


def read(doc):
    with open(os.path.join(ROOT, doc)) as file:
        return file.read()


def command_lines(text):
    """The shell command lines of a markdown text: its ```bash blocks (continuation lines joined, comments
    dropped, `&&` chains split) and its inline code that starts with `python`."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            lines += [part.strip() for part in line.split("&&")]
    lines += re.findall(r"`(python [^`]+)`", text)
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def invocations():
    """(doc, script, arguments) of every command line that runs one of the project's scripts."""
    found = []
    for doc in DOCS:
        for words in command_lines(read(doc)):
            while words and "=" in words[0] and not words[0].startswith("-"):  # VARIABLE=value before the command
                words = words[1:]
            if len(words) >= 2 and words[0] in ("python", "python3") and words[1] != "-m":
                found.append((doc, words[1], words[2:]))
            elif words and words[0].endswith("drm.sh"):
                found.append((doc, "benchmark/drm.sh", words[1:]))
    return found


def parse(script, arguments):
    """Parse the arguments as the script would, and check them as it does before any work."""
    name = os.path.basename(script)
    if name in SCRIPTS:
        module = SCRIPTS[name]
        args = tyro.cli(module.Args, args=arguments)
        if args.resume or args.eval_model:
            return  # the rest is the saved run's
        if module is drm:
            valid = [f"{domain}-{task}" for domain, task in drm.import_suite().ALL_TASKS]
        elif module is drm_adroit:
            valid = list(drm_adroit.ADROIT_TASKS)
        else:
            valid = list(drm_metaworld.import_metaworld())
        module.resolve_args(args, valid)
    elif name == "speed.py":
        cut = arguments.index("--") if "--" in arguments else len(arguments)
        args = tyro.cli(speed.Args, args=arguments[:cut])
        tyro.cli(SCRIPTS[args.script].Args, args=arguments[cut + 1 :])  # the flags it passes to the script
    elif name == "run.py" or name == "drm.sh":
        base = [] if name == "run.py" else ["--env-ids", "walker-walk", "--launcher", "slurm"]  # what drm.sh gives
        args = tyro.cli(run.Args, args=[*base, *arguments])
        run.check_args(args)
        for _, command in run.expand(args):  # each run's command parses as its script's
            parse(args.script, command[2:])
    else:
        tyro.cli(BENCHMARKS[name].Args, args=arguments)


INVOCATIONS = invocations()


def test_the_docs_hold_commands_of_every_script():
    scripts = {os.path.basename(script) for _, script, _ in INVOCATIONS}
    assert {"drm.py", "drm_adroit.py", "drm_metaworld.py", "run.py", "report.py", "speed.py", "official_parity.py",
            "checkpoint_cost.py", "metaworld_shadows.py", "soak.py", "drm.sh"} <= scripts  # fmt: skip


@pytest.mark.parametrize("doc, script, arguments", INVOCATIONS, ids=lambda value: value if isinstance(value, str) else None)
def test_every_documented_command_parses_with_todays_flags(doc, script, arguments):
    assert os.path.exists(os.path.join(ROOT, script)), f"{doc}: no {script}"
    try:
        parse(script, arguments)
    except SystemExit as stop:  # --help prints and exits with 0
        if stop.code not in (0, None):
            pytest.fail(f"{doc}: `{script} {shlex.join(arguments)}` does not parse: {stop}")


def known_flags():
    flags = set(OTHER_PROGRAMS_FLAGS)
    for module in [*SCRIPTS.values(), *BENCHMARKS.values()]:
        for field in module.Args.__dataclass_fields__:
            flag = "--" + field.replace("_", "-")
            flags |= {flag, flag.replace("--", "--no-", 1)}
    return flags


def test_every_flag_the_docs_name_exists():
    flags = known_flags()
    for doc in DOCS:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(re.findall(r"`[^`\n]+`|```.*?```", read(doc), re.DOTALL))))
        assert named <= flags, f"{doc} names flags that do not exist: {sorted(named - flags)}"


def logged_tags(path):
    """The TensorBoard tags a script writes: its literal tags, and the perf/ seconds of each Stopwatch phase."""
    tags = set(re.findall(r'"((?:charts|losses|eval|perf)/[a-z_0-9]+)"', read(path)))
    return tags | {f"perf/{phase}_seconds" for phase in (*drm.Stopwatch.PHASES, "wall")}


def test_every_tag_the_docs_name_is_logged():
    # a script's page names its tags; drm.md's are every script's (the other pages refer to them); the
    # topic pages' are some script's, or a tag report.py reads
    by_script = {script: logged_tags(script) for script in SCRIPTS}
    everywhere = set.intersection(*by_script.values())
    expected = {"docs/drm.md": everywhere, "docs/drm_adroit.md": by_script["drm_adroit.py"],
                "docs/drm_metaworld.md": by_script["drm_metaworld.py"]}  # fmt: skip
    anywhere = set.union(*by_script.values(), logged_tags("benchmark/report.py"))
    for doc in DOCS:
        named = set(re.findall(r"`((?:charts|losses|eval|perf)/[a-z_0-9]+)`", read(doc)))
        assert named <= expected.get(doc, anywhere), f"{doc} names tags that are not logged: {sorted(named - expected.get(doc, anywhere))}"


def test_every_link_and_named_output_file_exists():
    code = "".join(read(path) for path in [*SCRIPTS, *(f"benchmark/{name}" for name in BENCHMARKS)])
    for doc in DOCS:
        text = read(doc)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # relative links
            if not target.startswith("http"):
                path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
                assert os.path.exists(path), f"{doc} links {target}, which does not exist"
        # the files the runs write: each word of the name (its placeholders aside) is in the code
        for name in re.findall(r"`([^`\s]*\.(?:pt|tmp|json|lock|log|cleanrl_model|mp4|png))`", text):
            words = re.findall(r"[a-z][a-z_]{2,}", re.sub(r"\{[^}]*\}|\b[A-Z][A-Z_]*\b", " ", os.path.basename(name)))
            missing = [word for word in words if word not in code]
            assert not missing, f"{doc} names {name}, which nothing writes ({missing})"
