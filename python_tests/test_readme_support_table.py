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
