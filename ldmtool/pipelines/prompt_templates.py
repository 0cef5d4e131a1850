"""Prompt templates (dynamic prompts) with the `dynamicprompts` library, the parser the A1111 and ComfyUI
extensions use: variants `{a|b}`, counts `{2$$a|b|c}`, weights `{0.5::a|1::b}`, and `__name__` wildcards
read from a `--wildcards DIR` folder (`name.txt` one value per line, YAML or JSON files of named lists;
nested names as `__colors/warm__`). A `.txt` wildcard file is checked before the library reads it (which would
drop the bytes that are not UTF-8 and wait on a FIFO): a regular file within the size bound, in UTF-8.

Random mode (the default) expands a template when its item loads, seeded with the item's own seed (or the
run's seed plus the item's position under `--same-seed`), so an item's expansion is the same whatever the
batch size, order, shard or resume: the item carries the template, its seed picks the expansion.
`--combinatorial` turns each template line into one prompt line per combination before the run (at most
`--max-prompts` per template), each carrying its template. The combinations are counted first, without
expanding them, and a run of more than `COMBINATIONS_LIMIT` prompt lines is refused up front (a typo such as
ten 10-way variants would otherwise build 10^10 prompts before the plan could answer). The library is imported only when a prompt
has template syntax or a template option is given, so `ldmtool --help` never loads it.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ldmtool.errors import ItemError, UsageError
from ldmtool.pipelines.text import PromptSpec

_SYNTAX = re.compile(r"[{}]|__[^_\s]")  # a variant brace, or the start of a __wildcard__
_WILDCARD = re.compile(r"__([^_\s][^\s]*?)__")
_SEED_LIMIT = 2**32
COMBINATIONS_LIMIT = 100_000  # prompt lines that --combinatorial makes in one run, at most (README says so)

_READ_SUFFIXES = (".txt", ".yaml", ".json")  # the wildcard files dynamicprompts reads, by exact suffix


def is_template(text: Optional[str]) -> bool:
    """Whether `text` has template syntax (a `{...}` variant or a `__name__` wildcard)."""
    return bool(text) and _SYNTAX.search(text or "") is not None


def _check_structured_files(folder: Path) -> None:
    """A one-line UsageError naming a wildcard file the library would skip: a `.yml` or `.YAML` (it reads
    only `.txt`, `.yaml` and `.json`), or a YAML/JSON file it cannot parse (it logs a multi-line warning, and
    the names the file holds are then "not found")."""
    import os

    from dynamicprompts.wildcards.collection.structured import parse_structured_file

    from ldmtool.io.files import read_text_file, shown

    for dirname, dirnames, filenames in os.walk(folder, followlinks=True):  # as the library walks it
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for path in (Path(dirname) / name for name in sorted(filenames)):
            suffix = path.suffix.lower()
            if suffix in (*_READ_SUFFIXES, ".yml") and path.suffix not in _READ_SUFFIXES:
                renamed = path.stem + (".yaml" if suffix == ".yml" else suffix)
                raise UsageError(f"--wildcards: {shown(path)}: the wildcard library reads only .txt, .yaml and "
                                 f".json files and would skip this one; rename it to {renamed}")
            if path.suffix in _READ_SUFFIXES[1:]:
                try:
                    read_text_file(path)  # a regular file within the size bound (a FIFO would block the library)
                    list(parse_structured_file(path))
                except Exception as err:  # what the library catches, to log it and go on without the file
                    raise UsageError(f"--wildcards: {shown(path)}: not a readable wildcard file "
                                     f"({' '.join(str(err).split())[:200]})") from None


class PromptTemplates:
    """Expands templates against one wildcard folder (or none)."""

    def __init__(self, wildcards: Optional[Path] = None):
        if wildcards is not None and not Path(wildcards).is_dir():
            raise UsageError(f"--wildcards {wildcards}: no such folder")
        from dynamicprompts.wildcards import WildcardManager

        self.folder = Path(wildcards) if wildcards is not None else None
        if self.folder is not None:
            _check_structured_files(self.folder)
        self.manager = WildcardManager(self.folder)
        self._read_files: set[Path] = set()  # text wildcard files found readable

    def check(self, template: str) -> None:
        """A UsageError when the parser cannot read `template`, or naming its first wildcard that the folder
        does not have."""
        _parsed(template)
        for name in _WILDCARD.findall(template):
            self.check_files(name)
            if not self.manager.get_values(name):
                where = f"in --wildcards {self.folder}" if self.folder is not None else "(no --wildcards DIR given)"
                raise UsageError(f"wildcard __{name}__ not found {where}")

    def check_files(self, name: str, visiting: Optional[set[Path]] = None) -> None:
        """A UsageError naming the first `.txt` file of wildcard `name` (or of a wildcard its lines name) that
        is not a regular UTF-8 text file within the size bound (the library would read it with the bytes that are not UTF-8 left out: a Latin-1
        `café` as `caf`, a UTF-16 file as letters between NULs)."""
        from ldmtool.io.files import read_text_file, shown

        visiting = set() if visiting is None else visiting  # the files whose nested names are being checked
        for collection in self.manager.match_collections(name):
            path = getattr(collection, "_path", None)  # dynamicprompts' WildcardTextFile; YAML/JSON lists have none
            if path is None or path in self._read_files or path in visiting:
                continue
            try:
                text = read_text_file(path)
            except UnicodeDecodeError as err:
                raise UsageError(f"wildcard __{name}__: {shown(path)}: not UTF-8 text (byte {err.start + 1} is "
                                 f"0x{err.object[err.start]:02x}); save the file as UTF-8") from None
            except OSError as err:
                raise UsageError(f"wildcard __{name}__: {shown(path)}: cannot read the wildcard file "
                                 f"({err.strerror or err})") from None
            if "\x00" in text:
                raise UsageError(f"wildcard __{name}__: {shown(path)}: holds NUL characters (UTF-16?); save the "
                                 "file as UTF-8")
            visiting.add(path)
            for nested in _WILDCARD.findall(text):  # drawn inside the library's expansion, unchecked there
                self.check_files(nested, visiting)
            self._read_files.add(path)

    def random(self, template: str, seed: int) -> str:
        """The expansion of `template` for an item with this seed."""
        from dynamicprompts.generators import RandomPromptGenerator

        self.check(template)
        try:
            with _readable(template):  # a wildcard's value is parsed as it is drawn
                (text,) = RandomPromptGenerator(self.manager, seed=seed % _SEED_LIMIT).generate(template, 1)
        except RecursionError:  # a wildcard file drew a line naming itself (or one naming it), again and again
            names = ", ".join(f"__{name}__" for name in dict.fromkeys(_WILDCARD.findall(template)))
            raise ItemError(f"{_shortened(template)!r}: its wildcards ({names}) name themselves without end for "
                            f"seed {seed}; give each wildcard file a line that names no wildcard") from None
        self._check_expanded(text)
        return str(text)

    def count(self, template: str, max_prompts: Optional[int] = None) -> int:
        """How many prompts `combinations` gives (at most), counted without expanding the template."""
        from ldmtool.pipelines.prompt_count import CombinationCounter

        self.check(template)
        with _readable(template):
            count = CombinationCounter(self.manager, self.check_files).count(template)
        return count if max_prompts is None else min(count, max_prompts)

    def combinations(self, template: str, max_prompts: Optional[int]) -> list[str]:
        """Every combination of `template`, in the library's order (at most `max_prompts`)."""
        from dynamicprompts.generators import CombinatorialPromptGenerator

        self.check(template)
        with _readable(template):
            texts = [str(t) for t in CombinatorialPromptGenerator(self.manager).generate(template,
                                                                                         max_prompts=max_prompts)]
        for text in texts:
            self._check_expanded(text)
        return texts

    def _check_expanded(self, text: str) -> None:
        """A wildcard that a wildcard file names but the folder lacks is left as it is: refuse it. (A text
        without template syntax has nothing to check, and parsing each of many would take seconds.)"""
        if is_template(text):
            self.check(text)


def combinatorial(specs: Sequence[PromptSpec], templates: PromptTemplates,
                  max_prompts: Optional[int]) -> list[PromptSpec]:
    """Each template line as one line per combination (carrying its template); plain lines as they are.
    More than `COMBINATIONS_LIMIT` lines in all is a UsageError, counted before any is made."""
    check_combination_count(specs, templates, max_prompts)
    out: list[PromptSpec] = []
    for spec in specs:
        if not is_template(spec.prompt):
            out.append(spec)
            continue
        out += [replace(spec, prompt=text, template=spec.prompt)
                for text in templates.combinations(spec.prompt, max_prompts)]
    return out


def check_combination_count(specs: Sequence[PromptSpec], templates: PromptTemplates,
                            max_prompts: Optional[int]) -> None:
    """A one-line UsageError naming the template (or the total) when --combinatorial would make more than
    `COMBINATIONS_LIMIT` prompt lines."""
    total = 0
    for spec in specs:
        count = templates.count(spec.prompt, max_prompts) if is_template(spec.prompt) else 1
        if count > COMBINATIONS_LIMIT:
            raise UsageError(f"--combinatorial: {_shortened(spec.prompt)!r} makes {count:,} prompts, more than the "
                             f"{COMBINATIONS_LIMIT:,} a run may have (--max-prompts N takes the first N)")
        total += count
    if total > COMBINATIONS_LIMIT:
        raise UsageError(f"--combinatorial: the prompts make {total:,} prompt lines in all, more than the "
                         f"{COMBINATIONS_LIMIT:,} a run may have (--max-prompts N takes the first N per template)")


def _shortened(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def check_templates(specs: Sequence[PromptSpec], negative: Optional[str], templates: PromptTemplates,
                    prompts_file: Optional[Path] = None) -> None:
    """Every template of the run parses and every wildcard it names is in the folder: a one-line UsageError
    before anything runs, naming `--negative`, `--prompt`, or the prompt file and line."""
    lines = _prompt_lines(prompts_file) if prompts_file is not None else []
    named = [("--negative", negative or "")]
    for position, spec in enumerate(specs):
        where = f"{prompts_file}:{lines[position]}" if position < len(lines) else str(prompts_file or "--prompt")
        named += [(where, spec.prompt), (where, spec.negative or "")]
    for where, text in named:
        if is_template(text):
            try:
                templates.check(text)
            except UsageError as err:
                raise UsageError(f"{where}: {err}") from None


def _parsed(template: str) -> None:
    with _readable(template):
        from dynamicprompts.parser.parse import parse

        parse(template)


@contextmanager
def _readable(template: str) -> Iterator[None]:
    """The parser's error (pyparsing's, with its position) as a one-line UsageError naming the template."""
    from pyparsing import ParseBaseException

    try:
        yield
    except ParseBaseException as err:
        raise UsageError(f"{template!r} is not a valid prompt template ({' '.join(str(err).split())})") from None


def _prompt_lines(prompts_file: Path) -> list[int]:
    """The line numbers of a prompt file's prompts, in the order `read_prompts` gives them."""
    from ldmtool.io.files import read_text_file

    try:
        text = read_text_file(prompts_file)
    except (OSError, UnicodeDecodeError):  # read once already; changed since: the message names the file alone
        return []
    return [number for number, line in enumerate(text.split("\n"), 1)
            if line.strip() and not line.strip().startswith("#")]


def expanded(spec: PromptSpec, negative: str, templates: PromptTemplates, seed: int) -> PromptSpec:
    """A prompt line as one item runs it: its template prompt and negative expanded with `seed` (random
    mode), each template kept beside its expansion. A line expanded already (combinatorial) keeps its prompt."""
    changes: dict[str, Any] = {}
    if spec.template is None and is_template(spec.prompt):
        changes.update(prompt=templates.random(spec.prompt, seed), template=spec.prompt)
    if spec.negative_template is None and is_template(negative):
        changes.update(negative=templates.random(negative, seed), negative_template=negative)
    return replace(spec, **changes) if changes else spec


def needs_templates(specs: Sequence[PromptSpec], negative: Optional[str], *, wildcards: Optional[Path],
                    combinatorial: bool) -> bool:
    """Whether a run uses templates at all (only then is the library imported)."""
    return (wildcards is not None or combinatorial or is_template(negative)
            or any(is_template(spec.prompt) or is_template(spec.negative) for spec in specs))
