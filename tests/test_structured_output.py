"""Structured output through llguidance's token masks (engine/structured.py): greedy and sampled outputs of
a tiny random model under a JSON schema parse and validate against it (checked with `jsonschema`, an
independent validator); json_object gives an object; requests without a grammar in the same batches get
exactly the tokens they get alone (the mask is per row, and the engine's sync for grammar rows changes no
sample); a schema that is not one is refused naming json_schema."""

import json

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=256,
                  eos_token_id=(257,), dtype="float32")
SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["color", "ok", "n", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm():
    return LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off")


def test_json_schema_outputs_parse_and_validate(llm):
    prompts = ["hello", "def f(x):", "{", "x" * 40]
    params = [SamplingParams(max_tokens=80, json_schema=json.dumps(SCHEMA)),
              SamplingParams(max_tokens=80, json_schema=json.dumps(SCHEMA), temperature=1.0, seed=3),
              SamplingParams(max_tokens=80, json_schema=json.dumps(SCHEMA), temperature=0.7, seed=4,
                             repetition_penalty=1.3),
              SamplingParams(max_tokens=80, json_schema='{"type": "object"}', temperature=1.0, seed=5)]
    outs = llm.generate(prompts, params)
    for out, p in zip(outs, params):
        assert out.finish_reason == "stop", out.text  # EOS once the document is complete
        doc = json.loads(out.text)
        jsonschema.validate(doc, json.loads(p.json_schema))


def test_plain_requests_beside_grammar_ones_are_unchanged(llm):
    plain = [SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=12, temperature=1.0, seed=9)]
    alone = llm.generate(["abc", "defg"], plain)
    mixed = llm.generate(["abc", "zz", "defg"], [plain[0], SamplingParams(max_tokens=80, json_schema=json.dumps(SCHEMA)),
                                                 plain[1]])
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    jsonschema.validate(json.loads(mixed[1].text), SCHEMA)


def test_bad_schema_is_refused(llm):
    with pytest.raises(ValueError, match="json_schema"):
        llm.generate(["a"], SamplingParams(json_schema="{not json"))
    with pytest.raises(ValueError, match="json_schema"):
        llm.generate(["a"], SamplingParams(json_schema="[1, 2]"))
