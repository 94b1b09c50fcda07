"""Property tests of the data pipeline: any record, well-formed or not, in any format, through any template,
either becomes valid masked rows or is refused with RecordError/DataError; nothing else escapes. The same for
whole JSONL files (with garbage lines) through `prepare_data`, skipping bad records or not.

Valid rows: every label is -100 or the next input token of the same sample, exactly the loss-masked ones are
targets, no sample predicts across its end, no row exceeds max_length, and every token is accounted for.
Hypothesis runs derandomized (a fixed seed per test, no example database) so CI sees the same examples.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tunelab.config.schema import DataSettings
from tunelab.data.dataset import prepare_data
from tunelab.data.encode import IGNORE, Encoded, encode_samples, render, shifted_labels, split_document
from tunelab.data.formats import FORMATS, Conversation, Document, RecordError, to_sample
from tunelab.data.pack import pack_samples
from tunelab.data.templates import get_template
from tunelab.errors import DataError

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TEMPLATES = ["hf", "default", "internlm2_chat", "qwen_chat", "llama2_chat", "llama3_chat", "chatglm2", "gemma",
             "deepseek_v2", "code_llama_chat", "moss_sft", "zephyr"]

# Strings that mean something to a template, a tokenizer or a format.
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "### Human:", "### Assistant:",
           "{system}", "{input}", "{0}", "<nooutput>", "\n", " ", "", "你好", "\x00", "\u2028", "[INST]",
           "{% if %}", "{{ x }}", "\r\n", "\ufeff"]


def weighted(*choices):
    """one_of with integer weights. Hypothesis merges identical branches, so each copy is a distinct map."""
    return st.one_of(*[s.map(lambda x: x) for s, w in choices for _ in range(w)])


clean_texts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIAL)), max_size=4).map("".join)
# Broken Unicode: lone surrogates (what a JSON escape like \ud800 decodes to), any code point at all.
broken_texts = st.one_of(
    st.tuples(clean_texts, st.sampled_from(["\ud800", "\udfff", "\udc80"]), clean_texts).map("".join),
    st.text(st.characters(exclude_categories=()), min_size=1, max_size=8))
texts = weighted((clean_texts, 6), (broken_texts, 1))
# The default system prompt comes from the (validated) config, not from a record: valid Unicode only.
system_prompts = st.none() | clean_texts
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)
good_loss = st.none() | st.booleans() | st.sampled_from(["true", "false", "TRUE", " False "])
weird_loss = st.sampled_from(["yes", "", 0, 1, 1.0, None, [], {}, [True], "nan"]) | json_values
# Names a record may use for who speaks: right, wrong, and not even strings (lists and dicts are unhashable).
unhashable = st.lists(texts, max_size=2) | st.dictionaries(texts, texts, max_size=1)
roles = weighted((st.sampled_from(["system", "user", "assistant"]), 2),
                 (st.sampled_from(["tool", "", "User", None, 0, 1.5]), 1), (unhashable, 1))
speakers = weighted((st.sampled_from(["human", "gpt", "system", "user", "assistant", "chatgpt", "model", "bard"]), 2),
                    (st.sampled_from(["bot", "", "Human", None, 1]), 1), (unhashable, 1))
contents = texts | json_values


def _alternating(system, turns):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for user, reply, loss in turns:
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": reply, **({} if loss is None else {"loss": loss})})
    return {"messages": msgs}


def _xtuner(system, turns):
    out = []
    for i, (user, reply, loss) in enumerate(turns):
        turn = {"input": user, "output": reply}
        if i == 0 and system is not None:
            turn["system"] = system
        if loss is not None:
            turn["output_with_loss"] = loss
        out.append(turn)
    return {"conversation": out}


def _sharegpt(system, turns, speaker_names, system_key):
    out = [{"from": "system", "value": system}] if system is not None and not system_key else []
    for (user, reply, _), (u, a) in zip(turns, speaker_names):
        out += [{"from": u, "value": user}, {"from": a, "value": reply}]
    return {"conversations": out, **({"system": system} if system is not None and system_key else {})}


def _oasst1(turns, tags):
    return {"text": "".join(f"{tags[0]} {u}{tags[1]} {a}" for u, a, _ in turns)}


def _shaped(build, *extra, text=clean_texts, loss=good_loss):
    """Well-formed records of one format: a few turns, optionally a system prompt."""
    turns = st.lists(st.tuples(text, text, loss), min_size=1, max_size=3)
    return st.builds(build, st.none() | text, turns, *extra)


SHAPED = {
    "openai": _shaped(_alternating),
    "conversation": _shaped(_xtuner),
    "alpaca": st.fixed_dictionaries({"instruction": clean_texts, "output": clean_texts | st.just("<nooutput>")},
                                    optional={"input": clean_texts}),
    "sharegpt": _shaped(_sharegpt, st.lists(st.sampled_from([("human", "gpt"), ("user", "assistant"),
                                                             ("human", "chatgpt"), ("user", "model")]),
                                            min_size=3, max_size=3), st.booleans()),
    "oasst1": st.builds(_oasst1, st.lists(st.tuples(clean_texts, clean_texts, st.none()), min_size=1, max_size=3),
                        st.sampled_from([("### Human:", "### Assistant:"), ("###Human:", "### Assistant:")])),
    "pretrain": st.fixed_dictionaries({"text": clean_texts}),
}
# Records with the right top-level key but anything inside: wrong types, unknown roles, odd loss flags ...
MANGLED = {
    "openai": st.one_of(
        _shaped(_alternating, text=texts, loss=weird_loss),
        st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
            {"role": roles, "content": contents}, optional={"loss": weird_loss, "name": texts}), max_size=5)}),
        st.fixed_dictionaries({"messages": json_values})),
    "conversation": st.one_of(
        _shaped(_xtuner, text=texts, loss=weird_loss),
        st.fixed_dictionaries({"conversation": st.lists(st.dictionaries(
            st.sampled_from(["input", "output", "system", "output_with_loss"]), json_values), max_size=3)}),
        st.fixed_dictionaries({"conversation": json_values})),
    "alpaca": st.fixed_dictionaries({"instruction": contents, "output": contents}, optional={"input": contents}),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": st.lists(st.fixed_dictionaries({"from": speakers, "value": contents}) | json_values,
                                   max_size=5) | json_values},
        optional={"system": contents}) | _shaped(_sharegpt, st.just([("human", "gpt")] * 3), st.booleans(),
                                                 text=texts),
    "oasst1": st.builds(lambda parts: {"text": "".join(f"{tag} {body}" for tag, body in parts)},
                        st.lists(st.tuples(st.sampled_from(["### Human:", "### Assistant:", "### Robot:"]), texts),
                                 max_size=4)),
    "pretrain": st.fixed_dictionaries({"text": contents}),
}
records_of = {f: weighted((SHAPED[f], 3), (MANGLED[f], 1)) for f in FORMATS}
any_record = st.one_of(*records_of.values(), json_values)
# Mostly each format with records made for it, sometimes any record under any (or an unknown) format name.
format_and_record = st.one_of(*(st.tuples(st.just(f), records_of[f]) for f in FORMATS),
                              st.tuples(st.sampled_from([*FORMATS, "bogus"]), any_record))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def check_sample_labels(ids: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> None:
    """labels[t] is -100 or ids[t + 1]; the last is -100 (nothing is predicted across the sample's end)."""
    assert len(labels) == len(ids) and len(ids) > 0
    assert labels[-1] == IGNORE
    targets = labels[:-1] != IGNORE
    assert np.array_equal(labels[:-1][targets], ids[1:][targets])
    if mask is not None:  # exactly the loss-masked tokens (after the first) are targets
        assert np.array_equal(targets, mask[1:])


def check_rows(rows, pieces: list[tuple[np.ndarray, np.ndarray]], max_length: int, pack: bool) -> None:
    assert len(rows.seq_lens) == len(pieces)
    assert int(rows.offsets[-1]) == len(rows.input_ids) == sum(len(i) for i, _ in pieces)
    if not pack:
        assert len(rows) == len(pieces)
    got = Counter()
    for r in range(len(rows)):
        ids, labels, seq_lens = rows.row(r)
        assert 0 < len(ids) <= max_length
        assert int(seq_lens.sum()) == len(ids)
        start = 0
        for n in seq_lens.tolist():
            check_sample_labels(ids[start:start + n], labels[start:start + n])
            got[(tuple(ids[start:start + n].tolist()), tuple(labels[start:start + n].tolist()))] += 1
            start += n
    # packing keeps every sample, whole and unchanged
    assert got == Counter((tuple(i.tolist()), tuple(lab.tolist())) for i, lab in pieces)


@settings(max_examples=300, **SETTINGS)
# Known-nasty records, always tried on top of the generated ones.
@example(batch=[("sharegpt", {"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]}),
                ("sharegpt", {"conversations": [{"from": {"a": 1}, "value": "hi"}]}),
                ("openai", {"messages": [{"role": ["user"], "content": "hi"}]}),
                ("openai", {"messages": [{"role": "user", "content": "\ud800"},
                                         {"role": "assistant", "content": "x"}]}),
                ("pretrain", {"text": "a\udfffb"}), ("alpaca", {"instruction": "q", "output": "a\udc80"})],
         template="hf", system=None, max_length=64, pack=True)
@given(batch=st.lists(format_and_record, min_size=1, max_size=6), template=st.sampled_from(TEMPLATES),
       system=system_prompts, max_length=st.sampled_from([512, 64, 16, 4, 1]), pack=st.booleans())
def test_any_record_becomes_valid_rows_or_a_record_error(tok, batch, template, system, max_length, pack):
    renderer = get_template(template, tok)
    samples, segments = [], []
    for fmt, record in batch:
        try:
            sample = to_sample(record, fmt)
            if sample is None:
                continue
            segs = render(sample, renderer, system)
        except (RecordError, DataError) as e:
            event(f"refused: {type(e).__name__}")
            continue
        event(f"accepted: {type(sample).__name__}")
        assert segs and all(isinstance(t, str) and isinstance(loss, bool) for t, loss in segs)
        if isinstance(sample, Conversation):
            trained = "".join(t for t, loss in segs if loss)
            untrained = "".join(t for t, loss in segs if not loss)
            for m in sample.messages:
                # replies with loss on are in the trained text; prompts and loss-off replies are not trained
                assert m.content in (trained if m.role == "assistant" and m.loss else untrained)
        samples.append(sample)
        segments.append(segs)

    encoded = encode_samples(samples, segments, tok)
    assert len(encoded) == len(samples)
    pieces = []
    for sample, segs, enc in zip(samples, segments, encoded):
        assert len(enc.input_ids) == len(enc.loss_mask)
        if isinstance(sample, Document):
            assert enc.loss_mask.all() and len(enc.input_ids) > 0
            cut = split_document(enc, max_length)
            if max_length > 1:  # pieces overlap by one token: each token after the first is a target once
                rest = [c.input_ids[1:] for c in cut[1:]]
                assert np.array_equal(np.concatenate([cut[0].input_ids, *rest]), enc.input_ids)
                assert all(len(c.input_ids) > 1 for c in cut[1:])
        else:
            # each segment is tokenised on its own: the trained tokens decode to exactly the trained text
            decoded = tok.decode(enc.input_ids[enc.loss_mask].tolist(), skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
            assert decoded == "".join(t for t, loss in segs if loss)
            cut = [Encoded(enc.input_ids[:max_length], enc.loss_mask[:max_length])]  # training truncates
        for piece in cut:
            if len(piece.input_ids) == 0:
                continue
            labels = shifted_labels(piece)
            check_sample_labels(piece.input_ids, labels, piece.loss_mask)
            pieces.append((piece.input_ids, labels))

    rows = pack_samples([i for i, _ in pieces], [lab for _, lab in pieces], max_length, pack)
    check_rows(rows, pieces, max_length, pack)


# ---------------------------------------------------------------------------------------------- whole files


def _dump(record, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate written without escaping is invalid UTF-8 on disk, as a broken tool makes it
    return json.dumps(record, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


garbage_lines = st.one_of(
    st.text(max_size=30).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=30),
    st.sampled_from([b"", b"   ", b"{", b"[]", b"null", b"42", b'"text"', b"{'messages': []}", b"\xef\xbb\xbf{}",
                     b"[" * 3000 + b"]" * 3000, b'{"text": ' + b"7" * 5000 + b"}", b'{"text": "\\ud800"}',
                     b'{"messages": [{"role": "user", "content": "\\udfff"}, '
                     b'{"role": "assistant", "content": "x"}]}']),
    st.builds(_dump, any_record, st.booleans()),
)


def _file_of(fmt: str):
    """A file in one format: mostly its own records (well-formed or not), now and then a garbage line."""
    own = st.builds(_dump, records_of[fmt], st.booleans())
    return st.lists(weighted((own, 6), (garbage_lines, 1)).map(lambda b: b.replace(b"\n", b" ")),
                    min_size=1, max_size=8)


file_lines = st.sampled_from(FORMATS).flatmap(lambda f: st.tuples(st.just(f), _file_of(f)))


def _non_blank(lines: list[bytes]) -> int:
    """Records the JSONL reader sees: every line but the blank ones (a non-UTF-8 line is a record, a bad one)."""
    n = 0
    for raw in lines:
        try:
            n += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            n += 1
    return n


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("property_files")


@settings(max_examples=150, **SETTINGS)
@given(file=file_lines, declared=st.sampled_from(["auto", "auto", "auto", "as written", "as written", "any"]),
       other=st.sampled_from(FORMATS), template=st.sampled_from(TEMPLATES),
       max_length=st.sampled_from([512, 128, 2048, 48, 16, 3]), pack=st.booleans())
@pytest.mark.parametrize("skip_bad", [False, True])
def test_any_jsonl_file_loads_or_fails_with_file_and_line(tok, data_dir, skip_bad, file, declared, other, template,
                                                         max_length, pack):
    written, lines = file
    fmt = {"as written": written, "any": other}.get(declared, "auto")
    path = data_dir / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    data = DataSettings(path=str(path), format=fmt, prompt_template=template, max_length=max_length,
                        pack_to_max_length=pack, skip_bad_records=skip_bad, cache=False)
    try:
        prepared = prepare_data(data, tok)
    except DataError as e:
        msg = str(e)
        event(f"DataError: {msg.split(': ', 1)[-1][:25]}")
        if msg.startswith(f"no training samples in {path} "):
            event(msg[msg.index("("):])
            return
        # otherwise the error names the record: file:line, with a line of the file
        assert msg.startswith(f"{path}:"), msg
        line = int(msg[len(str(path)) + 1:].split(":", 1)[0])
        assert 1 <= line <= len(lines)
        if skip_bad:  # skipping only stops when the format cannot be told from the first usable record
            assert "cannot tell the data format" in msg, msg
        return

    s, rows = prepared.stats, prepared.rows
    event(f"loaded, {'some' if s.bad else 'no'} bad records, {'some' if s.dropped else 'none'} dropped, "
          f"{'some' if s.truncated else 'none'} truncated")
    assert s.records == _non_blank(lines)
    if not skip_bad:
        assert s.bad == 0
    assert len(s.bad_records) == s.bad
    assert all(b.reason and "\n" not in b.reason for b in s.bad_records)  # check-dataset prints one line each
    listed = [int(b.where.rsplit(":", 1)[1]) for b in s.bad_records]
    assert all(b.where == f"{path}:{n}" for b, n in zip(s.bad_records, listed))
    assert listed == sorted(set(listed)) and all(1 <= n <= len(lines) for n in listed)
    assert s.samples == len(rows.seq_lens) > 0 and s.rows == len(rows)
    assert s.tokens == len(rows.input_ids) == int(rows.seq_lens.sum())
    assert s.loss_tokens == int(np.count_nonzero(rows.labels != IGNORE)) > 0
    pieces = []
    for r in range(len(rows)):
        ids, labels, seq_lens = rows.row(r)
        start = 0
        for n in seq_lens.tolist():
            pieces.append((ids[start:start + n], labels[start:start + n]))
            start += n
    check_rows(rows, pieces, max_length, pack)
