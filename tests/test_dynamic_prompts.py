"""Prompt templates (dynamicprompts) in txt2img: combinatorial and random expansion, wildcards, metadata."""
from __future__ import annotations

import json

import pytest

from clirun import run_cli
from ldmtool.io.metadata import read_metadata
from ldmtool.pipelines.text import read_prompts

TINY = ("--steps", "1", "-W", "64", "-H", "64", "-q", "--seed", "11")


def _outputs(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")


def _recorded(folder):
    """{output name: (prompt, template, negative, negative template, seed)} from each image's metadata."""
    found = {}
    for path in _outputs(folder):
        meta = read_metadata(path)
        params = meta.recipe["parameters"]
        found[path.name] = (params["prompt"], params.get("template"), params.get("negative"),
                            params.get("negative_template"), meta.recipe["seed"])
        assert meta.parameters.split("\n")[0] == params["prompt"]
        if params.get("template"):
            assert f"Template: {params['template']}" in meta.parameters
    return found


def test_combinatorial_gives_every_combination_with_its_template(tmp_path):
    result = run_cli("txt2img", "--prompt", "a {red|blue} {circle|square}", "--combinatorial", *TINY,
                     "-o", tmp_path)
    assert result.exit_code == 0, result.output
    recorded = _recorded(tmp_path)
    assert sorted(prompt for prompt, *_ in recorded.values()) == [
        "a blue circle", "a blue square", "a red circle", "a red square"]
    assert {template for _, template, *_ in recorded.values()} == {"a {red|blue} {circle|square}"}
    capped = run_cli("txt2img", "--prompt", "a {red|blue} {circle|square}", "--combinatorial", "--max-prompts", "2",
                     *TINY, "-o", tmp_path / "capped")
    assert capped.exit_code == 0 and len(_outputs(tmp_path / "capped")) == 2


def test_random_expansions_follow_the_item_seed_whatever_the_batch_or_resume(tmp_path):
    args = ("--prompt", "a {red|green|blue|white} {circle|square|star}", "--negative", "{dark|flat}", "--n", "6", *TINY)
    assert run_cli("txt2img", *args, "--batch-size", "1", "-o", tmp_path / "b1").exit_code == 0
    assert run_cli("txt2img", *args, "--batch-size", "3", "-o", tmp_path / "b3").exit_code == 0
    one, three = _recorded(tmp_path / "b1"), _recorded(tmp_path / "b3")
    assert one == three and len(one) == 6
    assert len({prompt for prompt, *_ in one.values()}) > 1  # not every image the same pick
    assert all(neg in ("dark", "flat") and neg_template == "{dark|flat}" for _, _, neg, neg_template, _ in one.values())
    for path in _outputs(tmp_path / "b1")[1:5:2]:  # delete two, resume
        path.unlink()
    again = run_cli("txt2img", *args, "--batch-size", "3", "-o", tmp_path / "b1")
    assert again.exit_code == 0, again.output
    assert _recorded(tmp_path / "b1") == one


def test_same_seed_gives_every_expansion_the_run_seed(tmp_path):
    result = run_cli("txt2img", "--prompt", "a {red|green|blue|white} {circle|square|star}", "--n", "4",
                     "--same-seed", *TINY, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    recorded = _recorded(tmp_path)
    assert {seed for *_, seed in recorded.values()} == {11}
    assert len({prompt for prompt, *_ in recorded.values()}) > 1


def test_wildcard_folder_with_nested_names_and_yaml(tmp_path):
    cards = tmp_path / "cards"
    (cards / "colors").mkdir(parents=True)
    (cards / "colors" / "warm.txt").write_text("red\norange\n")
    (cards / "shapes.yaml").write_text("shapes:\n  round:\n    - circle\n    - ball\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a __colors/warm__ __shapes/round__\n{red|blue} car\n")
    result = run_cli("txt2img", "--prompts", prompts, "--wildcards", cards, "--combinatorial", *TINY,
                     "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    prompts_made = sorted(prompt for prompt, *_ in _recorded(tmp_path / "out").values())
    assert prompts_made == ["a orange ball", "a orange circle", "a red ball", "a red circle", "blue car", "red car"]


def test_a_missing_wildcard_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "cards").mkdir()
    result = run_cli("txt2img", "--prompt", "a __colors/cold__ fox", "--wildcards", tmp_path / "cards", *TINY,
                     "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "__colors/cold__" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, said", [
    ("colors.yml", "colors: [red, blue]\n", "{path}: the wildcard library reads only .txt, .yaml and .json files "
                                          "and would skip this one; rename it to colors.yaml"),
    ("colors.YAML", "colors: [red, blue]\n", "{path}: the wildcard library reads only .txt, .yaml and .json files "
                                           "and would skip this one; rename it to colors.yaml"),
    ("colors.yaml", "colors: [red, blue\n  - x: :\n", "{path}: not a readable wildcard file (while parsing a flow"),
    ("colors.json", '{"colors": ["red",]}', "{path}: not a readable wildcard file (Expecting value"),
])
def test_a_wildcard_file_the_library_would_skip_is_named_in_one_line(tmp_path, name, content, said):
    """A .yml file was skipped without a hint (then 'wildcard __colors__ not found'); a YAML file that did not
    parse printed the library's multi-line logging warning before that."""
    (tmp_path / "cards").mkdir()
    path = tmp_path / "cards" / name
    path.write_text(content)
    result = run_cli("txt2img", "--prompt", "a __colors__ fox", "--wildcards", tmp_path / "cards", *TINY,
                     "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"ldmtool: error: --wildcards: {said.format(path=path)}" in result.stderr


@pytest.mark.parametrize("source, where, template", [
    (("--prompt", "a {red|blue} circle, 50% off"), "--prompt", "a {red|blue} circle, 50% off"),
    (("--prompt", "a {red|blue circle", "--combinatorial"), "--prompt", "a {red|blue circle"),
    (("--prompt", "a fox", "--negative", "{ugly|blurry, 5% off"), "--negative", "{ugly|blurry, 5% off"),
    (("--prompts", "p.txt"), "p.txt:4", "a {red|blue circle"),
    (("--prompts", "p.jsonl"), "p.jsonl:2", "{ugly|blurry} 50% off"),
])
def test_a_template_the_parser_cannot_read_is_a_one_line_usage_error(tmp_path, monkeypatch, source, where, template):
    """Found before anything runs (every item failed with pyparsing's error, or --combinatorial crashed)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a fox\n\n# a comment\na {red|blue circle\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox"}\n{"prompt": "x", "negative": "{ugly|blurry} 50% off"}\n')
    result = run_cli("txt2img", *source, *TINY, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"ldmtool: error: {where}: {template!r} is not a valid prompt template (Expected ")
    assert not (tmp_path / "out").exists()


def test_variant_braces_in_a_plain_prompt_file_are_not_json(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a house\n{red|blue} car\n")
    assert [spec.prompt for spec in read_prompts(None, prompts)] == ["a house", "{red|blue} car"]
    assert json.dumps(read_prompts(None, prompts)[1].as_dict()).count("template") == 0


def test_help_loads_neither_torch_nor_dynamicprompts():
    import subprocess
    import sys

    code = ("import sys\nfrom ldmtool.cli.app import main\ntry:\n    main(['txt2img', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'dynamicprompts' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip().splitlines()[-1] == "False False"


def test_commands_that_take_a_prompt_as_written_say_so_once(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 150)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (150, 120, 90)).save(tmp_path / "b.png")
    result = run_cli("img2img", tmp_path / "a.png", tmp_path / "b.png", "--prompt", "a {red|blue} circle", "--steps",
                     "2", "-o", tmp_path / "out")  # 2 x 0.75: one step runs (1 step would run none, and say so)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("ldmtool: warning:")]
    assert warnings == ["ldmtool: warning: img2img takes its prompt as written: template syntax ({a|b}, "
                        "__wildcards__) is expanded by txt2img only"]
    assert read_metadata(tmp_path / "out" / "a.png").recipe["parameters"]["prompt"] == "a {red|blue} circle"


def test_combinatorial_refuses_a_billion_prompts_quickly_unless_max_prompts_caps_them(tmp_path):
    """Counted, not expanded: the dry run answers in seconds (it used to build 10^9 prompts first)."""
    import subprocess
    import sys

    template = " ".join(["{a|b|c|d|e|f|g|h|i|j}"] * 9)
    command = [sys.executable, "-m", "ldmtool", "txt2img", "--prompt", template, "--combinatorial", "--dry-run",
               "-o", str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "makes 1,000,000,000 prompts, more than the 100,000 a run may have (--max-prompts N" in line
    capped = subprocess.run(command + ["--max-prompts", "3"], capture_output=True, text=True, timeout=60)
    assert capped.returncode == 0, capped.stderr
    assert "dry run: 3 to run" in capped.stdout


def test_combinatorial_limit_counts_every_template_of_the_run(tmp_path, monkeypatch):
    from ldmtool.pipelines import prompt_templates

    monkeypatch.setattr(prompt_templates, "COMBINATIONS_LIMIT", 5)
    prompts = tmp_path / "p.txt"
    prompts.write_text("x {a|b|c}\ny {d|e|f}\n")
    result = run_cli("txt2img", "--prompts", prompts, "--combinatorial", "--dry-run", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "the prompts make 6 prompt lines in all, more than the 5" in result.stderr
    assert run_cli("txt2img", "--prompts", prompts, "--combinatorial", "--max-prompts", "2", "--dry-run",
                   "-o", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize("template", [
    "a {red|blue} {circle|square}", "{2$$a|b|c}", "{1-2$$a|b|c}", "__colors/warm__ __two__", "{2$$__colors/warm__}",
    "{~a|b} {x|y}", "{a|{b|c}} z", "${c={p|q|r}} ${c} and ${c}", "${c=!{p|q|r}} ${c}", "{@a|b|c} {x|y}",
    "{__two__|z}", "__colors/*__", "{0.5::a|1::b}", "plain",
])
def test_the_count_matches_the_expansion(tmp_path, template):
    from ldmtool.pipelines.prompt_templates import PromptTemplates

    (tmp_path / "colors").mkdir()
    (tmp_path / "colors" / "warm.txt").write_text("red\ngreen\n{light|dark} orange\n")
    (tmp_path / "two.txt").write_text("x\ny\n")
    templates = PromptTemplates(tmp_path)
    assert templates.count(template) == len(templates.combinations(template, None))


def test_a_wildcard_that_names_itself_is_a_usage_error(tmp_path):
    from ldmtool.errors import UsageError
    from ldmtool.pipelines.prompt_templates import PromptTemplates

    (tmp_path / "loop.txt").write_text("a __loop__\n")
    with pytest.raises(UsageError, match="wildcard __loop__ names itself"):
        PromptTemplates(tmp_path).count("__loop__")


@pytest.mark.parametrize("content, said", [
    ("café\nthé\n".encode("latin-1"), "wildcard __drinks__: {path}: not UTF-8 text (byte 4 is 0xe9); save the file as UTF-8"),
    ("café\nthé\n".encode("utf-16"), "wildcard __drinks__: {path}: not UTF-8 text (byte 1 is 0xff); save the file as UTF-8"),
    ("tea\n".encode("utf-16-le"), "wildcard __drinks__: {path}: holds NUL characters (UTF-16?); save the file as UTF-8"),
    (None, "wildcard __drinks__: {path}: cannot read the wildcard file (not a regular file (a FIFO))"),
])
@pytest.mark.parametrize("template", ["a cup of __drinks__", "a cup of __menu__"])
def test_a_wildcard_file_that_is_not_utf8_text_is_a_usage_error(tmp_path, content, said, template):
    """The library reads .txt wildcards leaving out the bytes that are not UTF-8: a Latin-1 'café' was drawn as
    'caf', a UTF-16 file as letters between NULs (and its BOM as a value of its own); a FIFO hung the run, also
    when named from another wildcard file (__menu__)."""
    import os

    from ldmtool.errors import UsageError
    from ldmtool.pipelines.prompt_templates import PromptTemplates

    path = tmp_path / "drinks.txt"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    (tmp_path / "menu.txt").write_text("__drinks__ or water\n")
    templates = PromptTemplates(tmp_path)
    for expand in (lambda: templates.random(template, 1), lambda: templates.count(template),
                   lambda: templates.combinations(template, None)):
        with pytest.raises(UsageError) as caught:
            expand()
        assert str(caught.value) == said.format(path=path)


def test_wildcards_that_draw_each_other_without_end_fail_the_item_in_one_line(tmp_path):
    """Random mode failed each item with 'RecursionError: maximum recursion depth exceeded'."""
    from ldmtool.errors import ItemError
    from ldmtool.pipelines.prompt_templates import PromptTemplates

    (tmp_path / "ping.txt").write_text("__pong__ ping\n")
    (tmp_path / "pong.txt").write_text("__ping__ pong\n")
    with pytest.raises(ItemError, match=r"'a __ping__': its wildcards \(__ping__\) name themselves without end"):
        PromptTemplates(tmp_path).random("a __ping__", 7)
