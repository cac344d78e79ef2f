"""The trtllm-build flag table the command checker uses (tests/data/trtllm_1_2_1_build_flags.json)
against the facts it was written from (facts/trtllm.md section 4, copied verbatim into
tests/data/facts/): every flag the facts name is in the table (or listed deprecated / removed),
and the defaults the facts give in bold are the table's."""

from __future__ import annotations

import json
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
FACTS = (DATA / "facts" / "trtllm_build_flags_s4.md").read_text()
TABLE = json.loads((DATA / "trtllm_1_2_1_build_flags.json").read_text())
# "Gone too" in the facts: flags of older trees that 1.2.1's parser no longer has
REMOVED = {"--strongly_typed", "--auto_parallel", "--gpus_per_node", "--cluster_key"}


def known(flag: str) -> bool:
    aliases = {a for spec in TABLE["flags"].values() for a in spec.get("aliases", ())}
    return flag in TABLE["flags"] or flag in TABLE["deprecated"] or flag in aliases


def test_every_flag_the_facts_name_is_in_the_table():
    named = set(re.findall(r"`(--[a-z0-9_]+)", FACTS))
    assert len(named) > 60
    assert sorted(f for f in named - REMOVED if not known(f)) == []
    assert not REMOVED & set(TABLE["flags"])


def test_bold_defaults_of_the_facts_are_the_tables():
    bold = dict(re.findall(r"`(--[a-z0-9_]+)`(?: \(alias `--[a-z_]+`\))? = \*\*([^*]+)\*\*", FACTS))
    assert {"--max_batch_size", "--max_num_tokens", "--gpt_attention_plugin",
            "--tokens_per_block", "--context_fmha"} <= set(bold)
    for flag, value in bold.items():
        default = TABLE["flags"][flag]["default"]
        value = value.strip("`").split()[0]
        if value.startswith("None"):
            assert default is None, flag
        elif value.isdigit():
            assert default == int(value), flag
        else:
            assert str(default).split()[0] == value, flag


def test_choices_of_log_level_follow_the_recorded_caveat():
    """The facts list debug and trace too (newer trees); the table records the logger it was read
    from and says so in its sources, so a command using them is refused, not silently passed."""
    levels = re.search(r"`--log_level` = `info` \(([^)]*)\)", FACTS).group(1).split(", ")
    assert set(TABLE["flags"]["--log_level"]["choices"]) == set(levels) - {"debug", "trace"}
    assert "debug, trace" in TABLE["sources"]["tensorrt_llm/logger.py"]
