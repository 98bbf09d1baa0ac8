"""The README's support tables list exactly the classes the tests decode and refuse."""

import re
from pathlib import Path

import tiny_families
import tiny_models

README = Path(__file__).resolve().parent.parent / "README.md"
CLASS = re.compile(r"`([A-Z]\w*(?:ForCausalLM|ForConditionalGeneration))`")


def _section(title: str, stop: str) -> str:
    text = README.read_text()
    start = text.index(title)
    return text[start:text.index(stop, start)]


def test_the_supported_table_is_the_tested_classes():
    table = _section("### Supported models", "Refused before any work")
    listed = set(CLASS.findall(table))
    tested = set(tiny_models._MODEL_CLASSES.values())
    tested |= {tiny_families._family_config(family, {})[0] for family in tiny_families.FAMILIES}
    tested.discard("MyQwen2")  # listed as "a user subclass of Qwen2ForCausalLM"
    assert "user subclass of `Qwen2ForCausalLM`" in table
    assert listed == tested, (sorted(listed - tested), sorted(tested - listed))


def test_the_refused_table_names_what_the_tests_refuse():
    table = _section("Refused before any work", "## Install")
    for phrase in ("sliding-window", "soft-capping", "attention sinks", "bidirectional", "recurrent state"):
        assert phrase in table, phrase
    for family in ("Gemma 2", "GPT-OSS", "Gemma 3", "Qwen3-Next", "Qwen3.5", "LFM2"):
        assert family in table, family
    assert set(tiny_families.REFUSED) == {"gemma2", "gpt_oss", "gemma3", "qwen3_next", "qwen3_5", "lfm2"}


def test_the_command_table_is_the_tested_processors():
    """`std_ext generate`'s table: one row per family whose checkpoint the command tests, with
    its model class, its processor class and the test that covers it."""
    import transformers

    import cli_checkpoints
    import test_cli_generate

    table = _section("### `std_ext generate`: the checkpoints it is tested with", "Every family asked for")
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "`" in line]
    listed = {}
    for _, cls, processor, test in (map(str.strip, row) for row in rows):
        family = re.fullmatch(r"`test_command_compare_is_exact\[(\w+)\]`", test).group(1)
        listed[family] = (cls.strip("`"), processor.strip("`"))
    assert sorted(listed) == sorted(cli_checkpoints.FAMILIES)
    assert test_cli_generate.test_command_compare_is_exact.pytestmark[0].args == ("family", cli_checkpoints.FAMILIES)
    for family, (cls, processor) in listed.items():
        spec = cli_checkpoints.FAMILY[family]
        assert type(spec.processor()).__name__ == processor, family
        model = spec.model()
        assert type(model).__name__ == cls, family
        assert transformers.AutoModelForImageTextToText._model_mapping[type(model.config)].__name__ == cls
